"""Write offline.html, the page template of `dvc plots show/diff`, from the npm packages of vega,
vega-lite and vega-embed: their minified builds inlined verbatim, so the page needs no network.

    npm pack vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0
    python vendor/vega/build_template.py vega-5.33.1.tgz vega-lite-5.23.0.tgz vega-embed-6.29.0.tgz

DVC fills `{plot_divs}` (and `{refresh_tag}`) and, since the page has no `{scripts}`, adds none of
its CDN links. The sha256 of each build is written in a comment and checked by tests/training/test_plots.py.
"""

import hashlib
import json
import sys
import tarfile
from pathlib import Path

BUILDS = {"vega": "build/vega.min.js", "vega-lite": "build/vega-lite.min.js", "vega-embed": "build/vega-embed.min.js"}
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>gptcore: DVC plots</title>
<!-- %(manifest)s -->
%(scripts)s
    <style>
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def main(tarballs: list[str]) -> None:
    manifest, scripts = [], []
    for tarball in tarballs:
        with tarfile.open(tarball) as tar:
            package = json.load(tar.extractfile("package/package.json"))
            code = tar.extractfile(f"package/{BUILDS[package['name']]}").read().decode("utf-8")
        if "</script" in code or "{plot_divs}" in code:
            raise SystemExit(f"{tarball}: the build cannot be inlined as is")
        digest = hashlib.sha256(code.encode("utf-8")).hexdigest()
        manifest.append(f"{package['name']}@{package['version']} {BUILDS[package['name']]} "
                        f"sha256:{digest} ({package['license']})")
        scripts.append(f"<script>{code}</script>")
    page = PAGE % {"manifest": "; ".join(manifest), "scripts": "\n".join(scripts)}
    (Path(__file__).parent / "offline.html").write_text(page, encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])
