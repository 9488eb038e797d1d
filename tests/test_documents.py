"""The PDF renderer (phi3v_tools.documents): pages, text layers, limits, and hostile documents in a worker process.

Every hostile document is rendered beside an innocent one (the demo document), which must come back whole.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from phi3v_tools.documents import DocumentPolicy, Renderer, TextLayer, has_text_layer, parse_pages
from phi3v_tools.errors import DocumentError, ImageError
from phi3v_tools.images import ImagePolicy, LoadedImage, PdfData, load_image, load_source
from tests import hostile_pdfs

pytest.importorskip("pypdfium2")

DEMO, HELLO = hostile_pdfs.DEMO, hostile_pdfs.HELLO


def beside_innocent(renderer: Renderer, hostile: bytes, **kwargs: object) -> BaseException | None:
    """Render ``hostile`` and the demo document at once; the demo must succeed. Returns the hostile one's error."""
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(renderer.render, hostile, "the hostile file", **kwargs)  # type: ignore[arg-type]
        good = pool.submit(renderer.render, DEMO, "the demo document")
        assert [p.number for p in good.result(timeout=60).pages] == [1, 2, 3]
        return bad.exception(timeout=60)


@contextlib.contextmanager
def innocent_meanwhile() -> Iterator[None]:
    """The demo document rendered by a sound renderer while the block runs (a faulty one, in these tests); it must
    come back whole."""
    with ThreadPoolExecutor(1) as pool:
        good = pool.submit(Renderer().render, DEMO, "the demo document")
        yield
        assert [p.number for p in good.result(timeout=60).pages] == [1, 2, 3]


def test_the_demo_document_renders_three_pages_within_the_pixel_limit_each_with_its_own_handle() -> None:
    doc = Renderer().render(DEMO, "demo.pdf")
    assert doc.page_count == 3 and [p.number for p in doc.pages] == [1, 2, 3]
    assert all(p.image.width * p.image.height <= 16 * 336 * 336 for p in doc.pages)
    assert len({p.image.handle for p in doc.pages}) == 3
    again = Renderer().render(DEMO, "demo.pdf", "3")
    assert [p.image.digest for p in again.pages] == [doc.pages[2].image.digest]  # drawing is deterministic


def test_real_text_layers_are_read_and_a_scans_invisible_ocr_layer_is_not() -> None:
    invoice, table, scan = Renderer().render(DEMO, "demo.pdf").pages
    assert invoice.text is not None and "Total: 1284.00 EUR" in invoice.text
    assert table.text is not None and "North 120 135 150" in table.text
    assert scan.layer is not None and scan.layer.invisible > 100 and scan.layer.visible == 0
    assert scan.text is None  # invisible text over a picture: another program's OCR, so the model reads it


def test_text_layers_off_reads_no_text() -> None:
    doc = Renderer(DocumentPolicy(text_layer=False)).render(DEMO, "demo.pdf")
    assert all(p.layer is None and p.text is None for p in doc.pages)


@pytest.mark.parametrize(
    ("layer", "real"),
    [
        (TextLayer("x" * 300, 300, 0, 0.0), True),
        (TextLayer("x" * 300, 0, 300, 1.0), False),  # OCR'd scan
        (TextLayer("x" * 300, 300, 0, 1.0), False),  # a caption on a full-page picture
        (TextLayer("x" * 900, 900, 0, 1.0), True),  # a page of text over a background picture
        (TextLayer("Page 3", 5, 0, 0.0), False),  # too little to be the page's content
        (TextLayer("x" * 300, 200, 100, 0.0), False),  # a third of it hidden
        (TextLayer("x" * 300, 300, 0, 0.0, crowded=True), False),
    ],
)
def test_a_text_layer_is_used_only_when_painted_substantial_and_not_a_caption_on_a_scan(
    layer: TextLayer, real: bool
) -> None:
    assert has_text_layer(layer) is real


def test_page_lists_parse_and_bad_ones_are_refused_before_any_worker_starts() -> None:
    assert parse_pages("1-3,7", 10) == [(1, 3), (7, 7)]
    assert parse_pages(" 5- ", 10) == [(5, None)]
    assert parse_pages("all", 10) == [(1, None)]
    assert parse_pages(None, 10) is None and parse_pages("", 10) is None
    for bad in ("0", "3-1", "a", "1,,2", "-", "1-2-3", "9" * 300):
        with pytest.raises(DocumentError):
            parse_pages(bad, 10)
    with pytest.raises(DocumentError, match="more than 10 pages"):
        parse_pages("1-999999999", 10)


def test_pages_select_and_a_page_past_the_end_is_a_clear_error() -> None:
    renderer = Renderer()
    assert [p.number for p in renderer.render(DEMO, "demo.pdf", "3,1").pages] == [3, 1]
    assert [p.number for p in renderer.render(DEMO, "demo.pdf", default_pages=2).pages] == [1, 2]
    with pytest.raises(DocumentError, match="page 9 is not in it"):
        renderer.render(DEMO, "demo.pdf", "9")
    with pytest.raises(DocumentError, match="page 5 is not in it"):
        renderer.render(DEMO, "demo.pdf", "2-5")


def test_pdfs_are_accepted_from_paths_data_uris_and_base64_and_images_still_load(tmp_path: Path) -> None:
    path = tmp_path / "doc.pdf"
    path.write_bytes(DEMO)
    policy = ImagePolicy(allowed_dirs=(tmp_path,))
    encoded = base64.b64encode(DEMO).decode()
    for ref in (str(path), "data:application/pdf;base64," + encoded, encoded, DEMO):
        loaded = load_source(ref, policy, pdf_max_bytes=2**20)
        assert isinstance(loaded, PdfData) and loaded.data == DEMO
    with pytest.raises(ImageError, match="limit for a PDF"):
        load_source(str(path), policy, pdf_max_bytes=1000)
    with pytest.raises(ImageError, match="not an image"):
        load_image("data:application/pdf;base64," + encoded, policy)  # where PDFs are not taken: as before
    image = io.BytesIO()
    Renderer().render(DEMO, "d").pages[0].image.image.save(image, "PNG")
    assert isinstance(load_source(image.getvalue(), policy, pdf_max_bytes=2**20), LoadedImage)


def test_a_file_over_the_byte_limit_is_refused_before_rendering() -> None:
    with pytest.raises(DocumentError, match="the limit for a PDF is 1000"):
        Renderer(DocumentPolicy(max_bytes=1000)).render(DEMO, "big.pdf")


# ---------------------------------------------------------------------------------------------------------------------
# Hostile documents


def test_a_truncated_or_corrupt_file_is_a_clear_error_and_the_neighbour_renders() -> None:
    renderer = Renderer()
    error = beside_innocent(renderer, hostile_pdfs.garbage())
    assert isinstance(error, DocumentError) and "refused" in str(error)
    error = beside_innocent(
        renderer, hostile_pdfs.truncated()
    )  # PDFium may repair a cut file; if it cannot, the error is clear
    assert error is None or isinstance(error, DocumentError)


def test_encrypted_documents_are_refused_with_or_without_a_user_password() -> None:
    pytest.importorskip("pypdf")
    renderer = Renderer()
    for user, expected in (("secret", "needs a password"), ("", "opens without a password")):
        error = beside_innocent(renderer, hostile_pdfs.encrypted(user))
        assert isinstance(error, DocumentError) and expected in str(error) and "qpdf --decrypt" in str(error)


def test_huge_page_boxes_are_drawn_within_the_pixel_limit_and_a_sliver_is_never_drawn_thinner_than_16_pixels() -> None:
    renderer = Renderer()
    doc = renderer.render(hostile_pdfs.giant_page(), "giant.pdf")
    assert doc.pages[0].image.width * doc.pages[0].image.height <= 16 * 336 * 336
    page = renderer.render(hostile_pdfs.gigapixel_page(), "user-unit.pdf").pages[0].image
    assert page.width * page.height <= 16 * 336 * 336
    sliver = hostile_pdfs.sliver_page()  # PDFium may clamp or replace such a box; else it is refused
    error = beside_innocent(renderer, sliver)
    if error is None:
        drawn = renderer.render(sliver, "sliver.pdf").pages[0].image
        assert drawn.width * drawn.height <= 16 * 336 * 336 and min(drawn.width, drawn.height) >= 16
    else:
        assert isinstance(error, DocumentError) and "too thin" in str(error)


def test_a_page_tree_of_100000_pages_opens_quickly_and_reads_only_the_pages_asked_for() -> None:
    n = 100_000
    many = hostile_pdfs.many_pages(n)
    started = time.monotonic()
    doc = Renderer().render(many, "many.pdf", "99999-100000")
    assert doc.page_count == n and [p.number for p in doc.pages] == [99_999, 100_000]
    assert time.monotonic() - started < 30
    assert [p.number for p in Renderer().render(many, "many.pdf").pages] == list(range(1, 11))  # the default
    with pytest.raises(DocumentError, match="more than 10"):
        Renderer().render(many, "many.pdf", "5-")


def test_deeply_nested_objects_and_a_cyclic_page_tree_are_bounded() -> None:
    renderer = Renderer()
    error = beside_innocent(renderer, hostile_pdfs.deeply_nested())
    assert error is None or isinstance(error, DocumentError)
    error = beside_innocent(renderer, hostile_pdfs.cyclic_tree())
    assert isinstance(error, DocumentError)


def test_javascript_launch_actions_and_embedded_files_are_never_acted_on(tmp_path: Path) -> None:
    script, marker = hostile_pdfs.launch_script(tmp_path)
    hostile = hostile_pdfs.with_actions(script, marker)
    assert beside_innocent(Renderer(), hostile) is None
    doc = Renderer().render(hostile, "actions.pdf")
    assert doc.pages[0].text is not None and "hostile file's neighbour" in doc.pages[0].text
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# The worker process: injected faults and a kill


def test_a_hanging_renderer_is_stopped_at_the_deadline_and_the_next_document_renders() -> None:
    hang = (sys.executable, "-c", "import time; time.sleep(600)")
    renderer = Renderer(DocumentPolicy(timeout_s=1.5, renderer=hang))
    started = time.monotonic()
    with innocent_meanwhile(), pytest.raises(DocumentError, match="longer than 1.5 s"):
        renderer.render(DEMO, "demo.pdf")
    assert time.monotonic() - started < 10 and not renderer.running
    assert len(Renderer().render(DEMO, "demo.pdf").pages) == 3


def test_a_crashing_renderer_fails_that_call_only() -> None:
    crash = (sys.executable, "-c", "import os, sys; sys.stdin.buffer.read(); os.abort()")
    with innocent_meanwhile(), pytest.raises(DocumentError, match="crashed on it"):
        Renderer(DocumentPolicy(renderer=crash)).render(DEMO, "demo.pdf")
    assert len(Renderer().render(DEMO, "demo.pdf").pages) == 3


def test_the_renderer_is_a_separate_process_that_can_be_killed_mid_document() -> None:
    slow = (sys.executable, "-c", "import time, sys; sys.stdin.buffer.read(); time.sleep(600)")
    renderer = Renderer(DocumentPolicy(timeout_s=60, renderer=slow))
    errors: list[BaseException] = []

    def call() -> None:
        try:
            renderer.render(DEMO, "demo.pdf")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 20
    while not renderer.running and time.monotonic() < deadline:
        time.sleep(0.02)
    (pid,) = renderer.running
    assert pid != os.getpid()
    with innocent_meanwhile():
        os.kill(pid, signal.SIGKILL)
        thread.join(30)
    assert len(errors) == 1 and isinstance(errors[0], DocumentError) and "killed" in str(errors[0])
    assert len(Renderer().render(DEMO, "demo.pdf").pages) == 3  # the server process is unharmed


def test_the_workers_memory_limit_stops_a_document_that_needs_more() -> None:
    hungry = (sys.executable, "-I", "-c", "import json, sys, resource; job = json.loads(sys.stdin.buffer.readline()); "
              "resource.setrlimit(resource.RLIMIT_AS, (job['memory_bytes'],) * 2); x = bytearray(2**31)")  # fmt: skip
    with innocent_meanwhile(), pytest.raises(DocumentError, match="more than 256 MiB"):
        Renderer(DocumentPolicy(memory_mb=256, renderer=hungry)).render(DEMO, "demo.pdf")


def test_pdf_settings_are_read_from_the_environment_and_a_bad_value_names_its_variable() -> None:
    from phi3v_tools.settings import Settings

    policy = Settings.from_env(
        {"PHI3V_PDF_MAX_PAGES": "3", "PHI3V_PDF_MAX_MB": "2", "PHI3V_PDF_TEXT_LAYER": "off", "PHI3V_PDF_WORKERS": "4"}
    ).document_policy()
    assert (policy.max_pages, policy.max_bytes, policy.text_layer, policy.workers) == (3, 2 * 2**20, False, 4)
    assert Settings().document_policy() == DocumentPolicy()
    with pytest.raises(ValueError, match="PHI3V_PDF_TIMEOUT_S"):
        Settings.from_env({"PHI3V_PDF_TIMEOUT_S": "0"})
    with pytest.raises(ValueError, match="PHI3V_PDF_MEMORY_MB"):
        Settings.from_env({"PHI3V_PDF_MEMORY_MB": "lots"})
