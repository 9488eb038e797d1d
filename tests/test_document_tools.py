"""The tools on PDF documents (issue 17): pages as images, per-page readings, text layers, merged fields, tables
across pages, concurrency, progress, and failures that stay in their call.

The toolbox tests use a fake backend that answers by page (it knows each page's image digest), so that the
results can be checked exactly; the surfaces' tests (MCP, LangChain, CLI) run the tiny model.
"""

from __future__ import annotations

import asyncio
import base64
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from phi3v_tools.documents import DocumentPolicy, Renderer
from phi3v_tools.errors import DocumentError, GenerationError, Phi3VToolsError, PromptError
from phi3v_tools.images import ImagePolicy
from phi3v_tools.pdf_samples import demo_document
from phi3v_tools.runner import GenerationRequest, GenerationResult
from phi3v_tools.tools import Table, TextReading, Toolbox, tool_specs
from tests import hostile_pdfs
from tests.fakes import FakeBackend

pytest.importorskip("pypdfium2")

DEMO = demo_document()  # page 1: an invoice (text layer), 2: a sales table (text layer), 3: a scan (hidden OCR text)
DEMO_B64 = base64.b64encode(DEMO).decode()


@pytest.fixture(scope="module")
def digests() -> dict[int, str]:
    """The demo document's page number -> the digest of its page image."""
    document = Renderer().render(DEMO, "demo.pdf")
    return {page.number: page.image.digest for page in document.pages}


class PageBackend(FakeBackend):
    """A fake backend whose answer depends on the page it is shown (``by_page``: page number -> answer)."""

    def __init__(self, digests: dict[int, str], by_page: dict[int, Any] | None = None) -> None:
        super().__init__()
        self._pages = {digest: number for number, digest in digests.items()}
        self.by_page = by_page or {}
        self.pages_asked: list[int] = []
        self._lock = threading.Lock()

    def _answer(self, request: GenerationRequest) -> GenerationResult:
        number = self._pages.get((request.image_digests or [""])[0], 0)
        with self._lock:
            self.pages_asked.append(number)
            if number in self.by_page:
                self.answers.insert(0, self.by_page[number])
            return super()._answer(request)


def toolbox(backend: Any, tmp_path: Path, **policy: Any) -> Toolbox:
    return Toolbox(backend, ImagePolicy(allowed_dirs=(tmp_path,)), documents=DocumentPolicy(**policy), max_compare=4)


def test_read_text_reads_each_page_text_layers_as_they_are_and_the_scan_by_the_model(
    digests: dict[int, str], tmp_path: Path
) -> None:
    scan = {"text": "SCANNED RECEIPT\nThank you", "lines": ["SCANNED RECEIPT", "Thank you"]}
    backend = PageBackend(digests, {3: scan})
    pdf = tmp_path / "demo.pdf"
    pdf.write_bytes(DEMO)
    reading = toolbox(backend, tmp_path).read_text(str(pdf))
    assert backend.pages_asked == [3]  # the pages with a real text layer need no model
    assert reading.page_count == 3 and reading.pages is not None
    assert [(p.page, p.source) for p in reading.pages] == [(1, "text"), (2, "text"), (3, "ocr")]
    assert reading.pages[0].text.startswith("Invoice INV-2041") and "Total: 1284.00 EUR" in reading.pages[0].lines
    assert "North 120 135 150" in reading.pages[1].lines
    assert reading.pages[2].text == scan["text"] and reading.pages[2].lines == scan["lines"]
    assert reading.text == "\n\n".join(p.text for p in reading.pages)
    assert reading.lines == [line for p in reading.pages for line in p.lines]
    # Each page has its own handle, the same in pages and images, with its page number.
    assert [(i.page, i.handle) for i in reading.images] == [(p.page, p.handle) for p in reading.pages]
    assert [i.handle for i in reading.images] == [f"image://sha256/{digests[n]}" for n in (1, 2, 3)]
    assert reading.call.seconds["render"] > 0 and reading.call.completion_tokens == 10
    text = reading.to_text()
    assert "--- page 1 (text layer) ---\nInvoice INV-2041" in text and "--- page 3 (read by the model) ---" in text


def test_pages_chooses_pages_and_a_page_alone_is_that_page_only(digests: dict[int, str], tmp_path: Path) -> None:
    backend = PageBackend(digests)
    reading = toolbox(backend, tmp_path).read_text(DEMO_B64, pages="2")
    assert reading.pages is not None and [p.page for p in reading.pages] == [2]
    assert reading.text.startswith("Quarterly sales by region") and backend.pages_asked == []
    assert [i.page for i in reading.images] == [2]
    reading = toolbox(backend, tmp_path).read_text(DEMO_B64, pages="3,1")  # in the order asked for
    assert reading.pages is not None and [p.page for p in reading.pages] == [3, 1]


def test_a_document_read_wholly_from_its_text_layers_loads_no_model(tmp_path: Path) -> None:
    def factory() -> Any:
        raise AssertionError("the model was loaded")

    tools = Toolbox(factory, ImagePolicy(allowed_dirs=(tmp_path,)))
    reading = tools.read_text(DEMO_B64, pages="1-2")
    assert reading.call.model == "text layer" and reading.call.completion_tokens == 0
    assert reading.pages is not None and [p.source for p in reading.pages] == ["text", "text"]


def test_with_text_layers_off_every_page_is_read_by_the_model(digests: dict[int, str], tmp_path: Path) -> None:
    backend = PageBackend(digests)
    reading = toolbox(backend, tmp_path, text_layer=False).read_text(DEMO_B64)
    assert sorted(backend.pages_asked) == [1, 2, 3]
    assert reading.pages is not None and {p.source for p in reading.pages} == {"ocr"}


def test_fields_merge_across_pages_as_the_first_non_null_value_with_its_page(
    digests: dict[int, str], tmp_path: Path
) -> None:
    backend = PageBackend(
        digests,
        {
            1: {"fields": {"total": "1284.00 EUR", "signature": None, "date": "2026-11-30"}},
            2: {"fields": {"total": "999", "signature": None, "date": None}},
            3: {"text": "signed", "lines": ["signed"], "fields": {"total": None, "signature": "A. Lind", "date": "x"}},
        },
    )
    reading = toolbox(backend, tmp_path).read_text(DEMO_B64, fields=["total", "signature", "date", "iban code"])
    assert sorted(backend.pages_asked) == [1, 2, 3]  # fields need the model, text layer or not
    assert reading.fields == {"total": "1284.00 EUR", "signature": "A. Lind", "date": "2026-11-30", "iban code": None}
    assert reading.field_pages == {"total": 1, "signature": 3, "date": 1, "iban code": None}
    assert reading.pages is not None and [p.source for p in reading.pages] == ["text", "text", "ocr"]
    assert reading.pages[1].fields == {"total": "999", "signature": None, "date": None, "iban code": None}
    assert reading.pages[0].text.startswith("Invoice")  # the text layer's text, not the model's
    assert "total: 1284.00 EUR (page 1)" in reading.to_text()


def test_read_table_gives_each_pages_table_and_joins_rows_of_a_table_that_runs_on(
    digests: dict[int, str], tmp_path: Path
) -> None:
    table = {"title": "Sales", "columns": ["Region", "Q1"], "units": None, "summary": "s"}
    backend = PageBackend(
        digests,
        {
            1: {**table, "rows": [["North", 120], ["South", 95]]},
            2: {**table, "title": None, "rows": [["East", 143], ["West"]]},  # a short row gets a null
            3: {**table, "columns": ["Item", "Price"], "rows": [["bracket", 111]], "stray": "ignored"},
        },
    )
    result = toolbox(backend, tmp_path).read_table(DEMO_B64)
    assert isinstance(result, Table) and result.pages is not None and result.page_count == 3
    assert result.title == "Sales" and result.columns == ["Region", "Q1"]
    assert result.rows == [["North", 120], ["South", 95], ["East", 143], ["West", None]]
    assert [(p.page, p.columns) for p in result.pages] == [
        (1, ["Region", "Q1"]),
        (2, ["Region", "Q1"]),
        (3, ["Item", "Price"]),
    ]
    assert [p.handle for p in result.pages] == [f"image://sha256/{digests[n]}" for n in (1, 2, 3)]
    text = result.to_text()
    assert "(rows from pages 1, 2)" in text and "--- page 3 ---" in text and "| bracket | 111 |" in text
    assert result.to_csv().splitlines() == ["Region,Q1", "North,120", "South,95", "East,143", "West,"]


def test_describe_compare_and_ask_take_pages_as_images(digests: dict[int, str], tmp_path: Path) -> None:
    backend = PageBackend(digests)
    tools = toolbox(backend, tmp_path)
    described = tools.describe_image(DEMO_B64)
    assert [(i.page, i.handle) for i in described.images] == [(1, f"image://sha256/{digests[1]}")]
    assert [i.page for i in tools.describe_image(DEMO_B64, pages="3").images] == [3]
    # Several PDFs share the images a call takes: by default each gives the pages that fit.
    two = tools.compare_images([DEMO_B64, DEMO_B64])
    assert [i.page for i in two.images] == [1, 2, 3, 1]
    asked = tools.ask_images([DEMO_B64], "Which page has a table?")
    assert [i.page for i in asked.images] == [1, 2, 3] and len(backend.requests[-1].images) == 3
    compared = tools.compare_images([DEMO_B64], pages="1,3")
    assert [i.page for i in compared.images] == [1, 3]
    # A page's handle stands for that page in a later call.
    again = tools.ask_images([asked.images[2].handle], "What is this?")
    assert again.images[0].handle == asked.images[2].handle and again.images[0].page is None


def test_page_choices_that_do_not_fit_are_clear_errors_before_the_model_runs(
    digests: dict[int, str], tmp_path: Path
) -> None:
    backend = PageBackend(digests)
    tools = toolbox(backend, tmp_path)
    tools.max_compare = 2
    drawn: list[str | None] = []
    render = tools.renderer.render
    tools.renderer.render = lambda data, source, pages=None, **kw: (
        drawn.append(pages) or render(data, source, pages, **kw)
    )  # type: ignore[method-assign]
    with pytest.raises(PromptError, match="describe_image looks at one page: pass pages='2'"):
        tools.describe_image(DEMO_B64, pages="1-2")
    assert drawn == []  # refused before any worker started
    with pytest.raises(PromptError, match="more pages asked for than fit; this tool takes 2 to 2: choose fewer pages"):
        tools.compare_images([DEMO_B64], pages="1-3")  # refused from the page list, before anything is drawn
    with pytest.raises(PromptError, match="3 images and pages given; this tool takes 2 to 2: choose fewer pages"):
        tools.compare_images([DEMO_B64], pages="1-")  # an open range: counted once drawn
    with pytest.raises(PromptError, match="1 image given; this tool takes 2 to 2 images or pages"):
        tools.compare_images([DEMO_B64], pages="2")
    Image.new("RGB", (32, 32), "white").save(tmp_path / "a.png")
    with pytest.raises(PromptError, match="no PDF was given"):
        tools.read_text(str(tmp_path / "a.png"), pages="2")
    with pytest.raises(DocumentError, match="not a page list"):
        tools.read_text(DEMO_B64, pages="two")
    with pytest.raises(DocumentError, match="has 3"):
        tools.read_text(DEMO_B64, pages="5")
    assert backend.requests == []
    assert tools.compare_images([DEMO_B64], pages="1-2").images[1].page == 2  # two pages fit


class GatedBackend(FakeBackend):
    """Holds each request until ``wanted`` requests are in at once (or fails after ``wait_s``): proof that the
    pages were sent together. ``fail_page`` (the order of arrival, from 1) raises instead of answering."""

    def __init__(self, wanted: int, wait_s: float = 20.0, fail: int | None = None) -> None:
        super().__init__()
        self.wanted, self.wait_s, self.fail = wanted, wait_s, fail
        self.barrier = threading.Barrier(wanted, timeout=wait_s)
        self.arrived = 0
        self.cancelled = 0
        self._lock = threading.Lock()
        self._all_in: asyncio.Event | None = None

    def generate_sync(self, request: GenerationRequest) -> GenerationResult:
        self.barrier.wait()  # raises BrokenBarrierError after wait_s if the pages came one at a time
        return self._answer(request)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        if self._all_in is None:
            self._all_in = asyncio.Event()
        with self._lock:
            self.arrived += 1
            mine = self.arrived
        if mine == self.wanted:
            self._all_in.set()
        try:
            await asyncio.wait_for(self._all_in.wait(), self.wait_s)
            if mine == self.fail:
                raise GenerationError("page failed on purpose")
            if self.fail is not None:
                await asyncio.sleep(60)  # the others would take long: they must be cancelled
            return self._answer(request)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


def test_the_pages_go_to_the_engine_at_once_from_the_sync_and_the_async_api(tmp_path: Path) -> None:
    pages: list[tuple[int, int]] = []
    reading = toolbox(GatedBackend(3), tmp_path, text_layer=False).read_text(
        DEMO_B64, on_page=lambda done, total: pages.append((done, total))
    )
    assert reading.pages is not None and len(reading.pages) == 3
    assert pages == [(0, 3), (1, 3), (2, 3), (3, 3)]
    tools = toolbox(GatedBackend(3), tmp_path, text_layer=False)
    table = asyncio.run(tools.aread_table(DEMO_B64, on_page=lambda done, total: pages.append((done, total))))
    assert table.pages is not None and len(table.pages) == 3 and pages[-1] == (3, 3)


def test_a_failing_page_fails_its_call_at_once_and_the_other_pages_are_cancelled(tmp_path: Path) -> None:
    backend = GatedBackend(3, fail=2)
    tools = toolbox(backend, tmp_path, text_layer=False)

    async def call() -> tuple[float, int, int]:
        started = time.monotonic()
        with pytest.raises(GenerationError, match="page failed on purpose"):
            await tools.aread_text(DEMO_B64)
        # Checked before asyncio.run's own clean-up could cancel anything: the call did it, and waited for it.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return time.monotonic() - started, backend.cancelled, len(others)

    waited, cancelled, left = asyncio.run(call())
    assert waited < 20 and cancelled == 2 and left == 0


def test_a_failing_page_in_the_sync_api_fails_the_call_and_sends_no_more_pages(
    digests: dict[int, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import phi3v_tools.tools as tools_module

    monkeypatch.setattr(tools_module, "PAGES_AT_ONCE", 1)  # one page at a time: the failure comes first
    backend = PageBackend(digests)
    backend.error = GenerationError("the engine failed")
    with pytest.raises(GenerationError, match="the engine failed"):
        toolbox(backend, tmp_path, text_layer=False).read_text(DEMO_B64)
    assert len(backend.pages_asked) == 1


def test_a_hostile_document_fails_its_call_and_the_call_beside_it_succeeds(tmp_path: Path) -> None:
    hostile = hostile_pdfs.garbage()
    tools = toolbox(FakeBackend(), tmp_path)

    async def both() -> tuple[BaseException | TextReading, ...]:
        return tuple(
            await asyncio.gather(tools.aread_text(base64.b64encode(hostile).decode()), tools.aread_text(DEMO_B64),
                                 return_exceptions=True)
        )  # fmt: skip

    bad, good = asyncio.run(both())
    assert isinstance(bad, Phi3VToolsError) and ("could not be rendered" in str(bad) or "refused" in str(bad))
    assert isinstance(good, TextReading) and good.pages is not None and len(good.pages) == 3


def test_every_tool_schema_offers_pages() -> None:
    for spec in tool_specs():
        schema = spec.args.model_json_schema()
        assert "pages" in schema["properties"] and "pages" not in schema.get("required", []), spec.name
        assert "PDF" in schema["properties"]["pages"]["description"], spec.name


def test_a_hanging_renderer_fails_its_mcp_call_within_the_limit_and_the_server_answers_the_next_call(
    tmp_path: Path,
) -> None:
    from mcp import Client
    from phi3v_mcp.server import create_server

    from phi3v_tools.settings import Settings

    hang = (sys.executable, "-c", "import time; time.sleep(600)")
    tools = toolbox(FakeBackend(), tmp_path, timeout_s=1.5, renderer=hang)
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), "white").save(image)

    async def calls() -> tuple[Any, Any, float]:
        async with Client(create_server(Settings(model="fake", allowed_dirs=(tmp_path,)), tools)) as client:
            started = time.monotonic()
            hanging = asyncio.ensure_future(client.call_tool("read_text", {"image": DEMO_B64}))
            beside = await client.call_tool("describe_image", {"image": str(image)})  # while the renderer hangs
            assert not beside.is_error and not hanging.done()
            hung = await hanging
            waited = time.monotonic() - started
            after = await client.call_tool("describe_image", {"image": str(image)})
            return hung, after, waited

    hung, after, waited = asyncio.run(calls())
    text = hung.content[0].text
    assert hung.is_error and "took longer than 1.5 s to render" in text and "Traceback" not in text
    assert waited < 10 and not tools.renderer.running  # the worker was killed at its deadline
    assert not after.is_error and after.structured_content["images"][0]["width"] == 32


def test_only_a_reference_that_says_pdf_is_read_under_the_larger_pdf_limit(tmp_path: Path) -> None:
    """An image is read under the image byte limit whatever the PDF limit; a big PDF needs a .pdf name, a
    data:application/pdf URI or base64 that starts with %PDF (a PDF within the image limit is found by its bytes)."""
    big = DEMO + b"%" + b" " * 300_000  # a comment after the end: still the demo document, 300 kB larger
    tools = Toolbox(FakeBackend(), ImagePolicy(allowed_dirs=(tmp_path,), max_bytes=200_000))
    (tmp_path / "big.pdf").write_bytes(big)
    (tmp_path / "big.bin").write_bytes(big)
    (tmp_path / "small.bin").write_bytes(DEMO)
    for ref in (str(tmp_path / "big.pdf"), "data:application/pdf;base64," + base64.b64encode(big).decode()):
        reading = tools.read_text(ref, pages="1")
        assert reading.pages is not None and reading.pages[0].source == "text"
    assert tools.read_text(str(tmp_path / "small.bin"), pages="2").pages is not None
    with pytest.raises(Phi3VToolsError, match="the limit is 200000"):
        tools.read_text(str(tmp_path / "big.bin"))
    with pytest.raises(Phi3VToolsError, match="larger than the 0.190735 MiB image limit"):
        tools.describe_image("data:image/png;base64," + "A" * 400_000)


def test_rows_join_only_across_consecutive_pages_of_the_same_table(digests: dict[int, str], tmp_path: Path) -> None:
    table = {"title": None, "units": None, "summary": ""}
    backend = PageBackend(
        digests,
        {
            1: {**table, "columns": ["A"], "rows": [["a1"]]},
            2: {**table, "columns": ["B"], "rows": [["b1"]]},
            3: {**table, "columns": ["A"], "rows": [["a3"]]},  # the same header again, after another table
        },
    )
    result = toolbox(backend, tmp_path).read_table(DEMO_B64)
    assert result.columns == ["A"] and result.rows == [["a1"]]
    assert "(rows from page 1)" in result.to_text() and "--- page 3 ---" in result.to_text()
