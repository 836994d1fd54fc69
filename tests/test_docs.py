"""The documentation site: the generated reference pages match the code, the site builds strictly, every
internal link and anchor of the built HTML resolves, every YAML example on the pages is a valid config, and
the pages render in a headless Chromium (Debian's package; skipped, with the reason, where it is missing)."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# a page per topic of the documentation, as the built site names them
TOPICS = ["index", "quickstart", "guides/data", "guides/python-api", "guides/hf-differences", "guides/strategies",
          "guides/memory", "guides/lora", "guides/checkpoints", "guides/search", "guides/launching", "benchmarks",
          "reference/cli", "reference/config", "reference/training-arguments", "reference/optimizers",
          "reference/api", "contributing"]
CONFIG_SECTIONS = {"task", "model", "data", "training", "search"}


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(command: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built as `make docs` builds it: strict, so any warning (a broken link or anchor) fails."""
    out = tmp_path_factory.mktemp("site")
    built = _run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], timeout=300)
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stdout}\n{built.stderr}"
    return out


def test_the_generated_pages_match_the_code(tmp_path):
    generator = _generator()
    if generator.unpinned_environment():
        pytest.skip(generator.unpinned_environment())
    made = _run([sys.executable, str(DOCS / "generate.py"), "--out", str(tmp_path)], timeout=300)
    assert made.returncode == 0, made.stderr
    stale = generator.stale_pages(tmp_path)
    assert not stale, "generated pages differ from the code; run `make docs` and commit them:\n" + \
        "\n".join(stale.values())


def test_the_site_has_a_page_per_topic(site):
    for page in TOPICS:
        path = site / f"{page}.html"
        assert path.is_file(), f"no page {page}.html in the built site"
        text = re.sub(r"<[^>]+>", " ", path.read_text())
        assert len(text.split()) > 150, f"{page}.html is almost empty"
    for plot in (ROOT / "benchmarks" / "results").glob("*.png"):
        assert (site / "assets" / "benchmarks" / plot.name).is_file(), f"{plot.name} is not in the site"


class _Links(HTMLParser):
    """The ids a page defines and the links (href, src) it makes."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for key in ("id", "name"):
            if values.get(key):
                self.ids.add(values[key])
        for key in ("href", "src"):
            if values.get(key) and not (tag == "link" and values.get("rel") == "canonical"):
                self.links.append(values[key])


def _pages(site: Path) -> dict[Path, _Links]:
    parsed = {}
    # 404.html is served at any missing path, so its links are written from the site's root (/...) on purpose
    for page in (p for p in site.rglob("*.html") if p.name != "404.html"):
        parser = _Links()
        parser.feed(page.read_text())
        parsed[page] = parser
    return parsed


def _broken(page: Path, link: str, pages: dict[Path, _Links], site: Path) -> str:
    """Why an internal link does not resolve ("" when it does)."""
    parts = urlsplit(link)
    if parts.scheme or parts.netloc or link.startswith(("mailto:", "data:", "javascript:")):
        return ""
    target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
    if target.is_dir():
        target = target / "index.html"
    if not target.is_relative_to(site.resolve()):
        return f"{link} leaves the site"
    if not target.exists():
        return f"{link}: no such file"
    anchors = pages[target].ids if target in pages else set()
    if parts.fragment and target.suffix == ".html" and unquote(parts.fragment) not in anchors:
        return f"{link}: no anchor #{parts.fragment} in {target.relative_to(site.resolve())}"
    return ""


def test_every_internal_link_and_anchor_resolves(site):
    pages = {path.resolve(): links for path, links in _pages(site).items()}
    broken = [f"{page.relative_to(site.resolve())}: {why}" for page, links in pages.items()
              for why in (_broken(page, link, pages, site) for link in links.links) if why]
    assert not broken, "broken internal links:\n" + "\n".join(sorted(set(broken)))
    assert sum(len(links.links) for links in pages.values()) > 500  # the check saw the site's links


def _yaml_examples() -> list[tuple[str, str]]:
    """(where, text) of every YAML block of the README and the hand-written pages, with included files read in."""
    examples = []
    for page in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        if "templates" in page.parts:
            continue
        for block in re.findall(r"```yaml\n(.*?)```", page.read_text(), flags=re.DOTALL):
            include = re.fullmatch(r'--8<-- "([^"]+)"\n', block)
            text = (ROOT / include.group(1)).read_text() if include else block
            examples.append((f"{page.relative_to(ROOT)}: {include.group(1) if include else block[:40]!r}", text))
    return examples


def test_every_yaml_example_is_a_valid_config(tmp_path):
    from scaletrain.args.run_config import load_config

    checked = 0
    for where, text in _yaml_examples():
        raw = yaml.safe_load(text)
        if not isinstance(raw, dict) or not set(raw) <= CONFIG_SECTIONS:
            continue
        if "training" in raw:  # a snippet's outputs stay in the test's folder
            raw["training"] = dict(raw["training"] or {}, output_dir=str(tmp_path / "out"))
        path = tmp_path / "example.yaml"
        path.write_text(yaml.safe_dump(raw))
        try:
            load_config(path)
        except Exception as exc:  # noqa: BLE001 - any refusal is the finding
            pytest.fail(f"{where} is not a valid config: {type(exc).__name__}: {exc}")
        checked += 1
    assert checked >= 10, f"only {checked} YAML examples found"


def _chromium() -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); .ci/run installs it in CI")
    return browser


def _headless(browser: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", *args], capture_output=True, text=True, timeout=120, check=False)


def test_the_index_renders_in_headless_chromium(site, tmp_path):
    from PIL import Image

    browser = _chromium()
    shot = tmp_path / "index.png"
    _headless(browser, f"--screenshot={shot}", "--window-size=1200,900", (site / "index.html").as_uri())
    assert shot.is_file(), "chromium wrote no screenshot"
    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=image.width * image.height)
    background = max(count for count, _ in colours)
    assert len(colours) > 20, f"the screenshot has {len(colours)} colours: a blank page"
    assert background < 0.95 * image.width * image.height, "the screenshot is almost one colour: a blank page"
    header = image.getpixel((image.width // 2, 10))
    assert min(header) < 200, f"the header is {header}, not the theme's colour: the stylesheet did not load"


def _looks_rendered(tile) -> str:
    """Why a screenshot of one page does not look like a rendered page of the site ("" when it does)."""
    colours = tile.getcolors(maxcolors=tile.width * tile.height)
    if len(colours) < 20 or max(count for count, _ in colours) > 0.97 * tile.width * tile.height:
        return "blank"
    if min(tile.getpixel((tile.width // 2, 10))) > 200:
        return "no theme header (the stylesheet did not load, or the page is missing)"
    body = tile.crop((0, 60, tile.width, tile.height)).convert("L")
    if sum(1 for value in body.getdata() if value < 100) < 0.003 * body.width * body.height:
        return "no text under the header"
    return ""


def test_every_page_renders_in_headless_chromium(site, tmp_path):
    """One browser run: every page of the site in a frame of one harness page, one screenshot, each tile checked."""
    from PIL import Image

    browser = _chromium()
    width, height, columns = 600, 450, 6
    frames = "".join(f'<iframe src="{(site / f"{page}.html").as_uri()}" width="{width}" height="{height}" '
                     'style="border:0;display:block;float:left"></iframe>' for page in TOPICS)
    harness = tmp_path / "harness.html"
    harness.write_text(f'<html><body style="margin:0;width:{width * columns}px">{frames}</body></html>')
    rows = -(-len(TOPICS) // columns)
    shot = tmp_path / "pages.png"
    _headless(browser, "--allow-file-access-from-files", f"--screenshot={shot}",
              f"--window-size={width * columns},{height * rows}", harness.as_uri())
    image = Image.open(shot).convert("RGB")
    problems = []
    for i, page in enumerate(TOPICS):
        left, top = (i % columns) * width, (i // columns) * height
        why = _looks_rendered(image.crop((left, top, left + width, top + height)))
        if why:
            problems.append(f"{page}.html: {why}")
    assert not problems, f"pages that did not render (screenshot {shot}): {problems}"
