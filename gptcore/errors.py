"""The exceptions gptcore raises for problems a user can fix; entry points print them as one line
(or, for a list of problems, a line and one indented line per problem)."""


class GptcoreError(Exception):
    """A user-facing error: bad input, missing file, unreachable service. Printed without a traceback."""


class ProblemsError(GptcoreError):
    """Several problems found at once (a params file with several wrong values): printed as a first line
    and one indented line per problem, so that all of them are fixed in one go."""

    def __init__(self, where: str, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n  ".join([f"{where}: {len(problems)} problems:", *self.problems]))


class ConfigError(GptcoreError):
    """A params.yaml section or a model config that is malformed."""


class ConfigProblems(ProblemsError, ConfigError):
    """A params.yaml with several problems: each one on its own line with its key path."""


class DataError(GptcoreError):
    """An input data file that is missing, corrupt or not in the expected format."""


class WeightsError(GptcoreError):
    """A weights, progress or OpenAI checkpoint file that cannot be loaded safely."""


class DownloadError(GptcoreError):
    """A download that failed after retries, or whose size or digest does not match."""


class TrainingError(GptcoreError):
    """Training cannot go on: a non-finite loss (diverged, or fp16 overflow). Progress saved so far is kept."""
