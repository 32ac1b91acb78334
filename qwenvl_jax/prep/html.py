"""HTML pages as OCR data (Appendix A.4): headless Chromium renders each page, the DOM gives the
boxes of its text.

  python -m qwenvl_jax.prep html --input='pages/*.html' --output=out/html [--width=1024]

The paper rendered its web pages with Puppeteer (Chromium's DevTools protocol from Node); this
speaks the same protocol to Debian's `chromium` directly, over `--remote-debugging-pipe`, so no
Node, Puppeteer or driver download is needed. Per page: set the viewport to `--width`, load the
page, grow the viewport to the page's full height (up to `--max_height`), read every visible text
node's words with `Range.getClientRects()` and group them into lines, and take a screenshot of
the same layout. The paper's steps: (1) extract all texts, (2) render the page to an image, then
drop (3) too small pages, (4) pages with too many or too few characters, (5) pages with Private
Use Area characters (`ocr_page.HTML_FILTERS`; no Latin Extended filter for HTML, as in the paper).

An input is an `.html`/`.htm` file (one page) or a text file listing HTML files, one a line (one
shard). One browser serves a whole shard. Network access is off unless `--allow_network` (pages
render from what is on disk; a page's remote CSS, fonts and images are not fetched).
"""

from __future__ import annotations

import base64
import fcntl
import functools
import io
import json
import os
import posixpath
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from PIL import Image

from qwenvl_jax import fileio
from qwenvl_jax.errors import ConfigError, MissingPathError, UserError
from qwenvl_jax.prep import ocr_page
from qwenvl_jax.prep.ocr_page import OcrPage, TextLine
from qwenvl_jax.prep.steps import Step

HELP = "A.4: web pages rendered by headless Chromium, text boxes from the DOM, the page filters"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")

# Every visible text's words, grouped into the lines the layout made: a word joins the current line
# when it sits on the same line just after it (within about one space; also across inline
# elements such as <b>), else it starts a new one. One {text, x0, y0, x1, y1} per line, in
# document order, in page pixels.
_TEXT_BOXES_JS = r"""
(() => {
  const skip = new Set(["SCRIPT", "STYLE", "NOSCRIPT", "TEMPLATE", "TEXTAREA", "TITLE", "HEAD"]);
  const walker = document.createTreeWalker(document.body || document.documentElement,
                                           NodeFilter.SHOW_TEXT);
  const out = [];
  const sx = window.scrollX, sy = window.scrollY;
  let line = null;
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const el = node.parentElement;
    if (!el || skip.has(el.tagName)) continue;
    const style = getComputedStyle(el);
    if (style.visibility !== "visible" || parseFloat(style.opacity) === 0) continue;
    for (const m of node.data.matchAll(/\S+/g)) {
      const range = document.createRange();
      range.setStart(node, m.index);
      range.setEnd(node, m.index + m[0].length);
      const rects = [...range.getClientRects()].filter(r => r.width > 0 && r.height > 0);
      if (!rects.length) continue;
      const r = rects[0];
      const h = line ? line.y1 - line.y0 : 0;
      const sameLine = line && Math.abs(r.top + sy - line.y0) < 0.5 * h
                       && r.left + sx >= line.x1 - 1 && r.left + sx - line.x1 < 0.6 * h;
      if (sameLine) {
        // A gap of a space (about 0.25 of the line height) separates words; "a<b>b</b>" has none.
        line.text += (r.left + sx - line.x1 > 0.12 * h ? " " : "") + m[0];
        line.x1 = Math.max(line.x1, r.right + sx);
        line.y0 = Math.min(line.y0, r.top + sy);
        line.y1 = Math.max(line.y1, r.bottom + sy);
      } else {
        if (line) out.push(line);
        line = {text: m[0], x0: r.left + sx, y0: r.top + sy, x1: r.right + sx, y1: r.bottom + sy};
      }
    }
  }
  if (line) out.push(line);
  return out;
})()
"""
_HEIGHT_JS = (
    "Math.max(document.documentElement.scrollHeight,"
    " document.body ? document.body.scrollHeight : 0)"
)


def find_browser() -> str | None:
    """The path of a Chromium (Debian's `chromium` package) on PATH, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


_TRAMPOLINE = (
    "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4);"
    " os.execv(sys.argv[3], sys.argv[3:])"
)


def _above_4(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Chromium:
    """A headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4 of the
    browser; messages are JSON, each ended by a NUL byte).

    Use as a context manager; `page(path_or_url, ...)` renders one page.
    """

    def __init__(self, browser: str | None = None, *, allow_network: bool = False, timeout=60.0):
        self.browser = browser or find_browser()
        if self.browser is None:
            raise UserError(
                "no Chromium found on PATH (tried " + ", ".join(BROWSERS) + "); install Debian's"
                " `chromium` package (apt-get install chromium)"
            )
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="qwenvl-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # The child's ends move above fd 4, so that moving them to 3 and 4 cannot overwrite one
        # with the other (either may have been given fd 3 or 4).
        to_browser_r, from_browser_w = _above_4(to_browser_r), _above_4(from_browser_w)
        flags = [
            "--headless",
            "--remote-debugging-pipe",
            "--no-sandbox",  # containers and root; pages are the user's own files
            "--disable-gpu",
            "--hide-scrollbars",
            "--mute-audio",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--font-render-hinting=none",
            f"--user-data-dir={self._profile}",
        ]
        if not allow_network:
            flags.append("--host-resolver-rules=MAP * ~NOTFOUND")
        # A small Python trampoline puts the pipe ends at fds 3 and 4, where Chromium expects them
        # (a preexec_fn would do it too, but is unsafe in a threaded runner such as Beam's; a
        # shell's `3<&N` takes single-digit N only in dash).
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _TRAMPOLINE, str(to_browser_r), str(from_browser_w)]
            + [self.browser, *flags, "about:blank"],
            pass_fds=(to_browser_r, from_browser_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._buf = b""
        self._events: list[dict] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Ends the browser and removes its profile."""
        if self._proc.poll() is None:
            try:
                self.call("Browser.close")
            except (OSError, RuntimeError, TimeoutError):
                pass
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"Chromium did not answer within {self.timeout:.0f} s")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium exited (code {self._proc.poll()})")
                self._buf += chunk
        msg, _, self._buf = self._buf.partition(b"\0")
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Sends one command and returns its result (events that arrive meanwhile are kept)."""
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self._to_browser, data) :]
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"Chromium {method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            if "method" in reply:
                self._events.append(reply)

    def wait_event(self, method: str, session: str) -> dict:
        """Waits for the event `method` of `session` (or takes it if it already came)."""
        deadline = time.monotonic() + self.timeout
        while True:
            for i, ev in enumerate(self._events):
                if ev["method"] == method and ev.get("sessionId") == session:
                    return self._events.pop(i)
            self._events.append(self._read_message(deadline))

    def _evaluate(self, expression: str, session: str):
        res = self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session
        )
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails'].get('text')}")
        return res["result"].get("value")

    def page(
        self, url: str, *, width: int = 1024, max_height: int = 4096, key: str = "page"
    ) -> OcrPage:
        """Renders `url` (a `file://` or `http(s)://` URL) to its full height, up to `max_height`,
        and returns the screenshot with the text lines' boxes in its pixels."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        try:
            self.call("Page.enable", {}, s)
            metrics = {"width": width, "height": 768, "deviceScaleFactor": 1, "mobile": False}
            self.call("Emulation.setDeviceMetricsOverride", metrics, s)
            self._events = [e for e in self._events if e.get("sessionId") != s]
            nav = self.call("Page.navigate", {"url": url}, s)
            if nav.get("errorText"):
                raise ConfigError(f"{url}: Chromium could not load it ({nav['errorText']})")
            self.wait_event("Page.loadEventFired", s)
            height = int(min(max(self._evaluate(_HEIGHT_JS, s) or 1, 1), max_height))
            self.call("Emulation.setDeviceMetricsOverride", dict(metrics, height=height), s)
            boxes = self._evaluate(_TEXT_BOXES_JS, s) or []
            shot = self.call("Page.captureScreenshot", {"format": "png"}, s)
        finally:
            self.call("Target.closeTarget", {"targetId": target})
        image = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
        w, h = image.size
        lines = []
        for b in boxes:
            quad = ocr_page.clip_quad(ocr_page.box_quad(b["x0"], b["y0"], b["x1"], b["y1"]), w, h)
            if quad is not None:
                lines.append(TextLine(b["text"], quad))
        return OcrPage(image, lines, key=key)


def read_html(
    path: str, *, width: int = 1024, max_height: int = 4096, allow_network: bool = False
) -> Iterator[dict]:
    """The `ocr` records of an HTML file, or of the HTML files a list file names (one browser)."""
    paths = ocr_page.input_paths(path, (".html", ".htm"))
    with Chromium(allow_network=allow_network) as browser, tempfile.TemporaryDirectory() as tmp:
        for i, p in enumerate(paths):
            if fileio.is_remote(p):  # the browser reads local files: copy it down first
                local = os.path.join(tmp, f"{i}.html")
                with open(local, "wb") as f:
                    f.write(fileio.read_bytes(p))
            else:
                local = os.path.abspath(p)
                if not os.path.isfile(local):
                    raise MissingPathError(f"{path}: HTML file not found: {p}")
            stem = posixpath.basename(os.fspath(p)).rsplit(".", 1)[0]
            page = browser.page(
                "file://" + local, width=width, max_height=max_height, key=f"{stem}-{i:05d}"
            )
            yield page.record()


def add_arguments(p) -> None:
    p.add_argument("--width", type=int, default=1024, help="viewport width (px)")
    p.add_argument("--max_height", type=int, default=4096, help="screenshot height cap (px)")
    p.add_argument("--allow_network", action="store_true", help="let pages fetch http(s) assets")
    ocr_page.add_filter_arguments(p, ocr_page.HTML_FILTERS)


def run(args, pipeline_args) -> dict:
    from qwenvl_jax.prep import runner

    if args.width <= 0 or args.max_height <= 0:
        raise ConfigError("--width and --max_height must be > 0")
    if find_browser() is None:
        raise UserError("html: no Chromium on PATH; install Debian's `chromium` package")
    filters = ocr_page.filters_from(args, ocr_page.HTML_FILTERS)
    steps = [Step("page_filters", functools.partial(ocr_page.filter_pages, filters=filters))]
    reader = functools.partial(
        read_html, width=args.width, max_height=args.max_height, allow_network=args.allow_network
    )
    return runner.run(
        steps,
        args.input,
        args.output,
        seed=args.seed,
        runner=args.runner,
        pipeline_args=pipeline_args,
        reader=reader,
        mixture={"train": {"task": "ocr", "box_format": "xyxy_pixel"}},
    )
