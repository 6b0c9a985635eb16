"""The exceptions gptcore raises for problems a user can fix; entry points print them as one line."""


class GptcoreError(Exception):
    """A user-facing error: bad input, missing file, unreachable service. Printed without a traceback."""


class ConfigError(GptcoreError):
    """A params.yaml section or a model config that is malformed."""


class DataError(GptcoreError):
    """An input data file that is missing, corrupt or not in the expected format."""


class WeightsError(GptcoreError):
    """A weights, progress or OpenAI checkpoint file that cannot be loaded safely."""


class DownloadError(GptcoreError):
    """A download that failed after retries, or whose size or digest does not match."""


class TrainingError(GptcoreError):
    """Training cannot go on: a non-finite loss (diverged, or fp16 overflow). Progress saved so far is kept."""
