"""The seed notebook's three tasks and a table, on pictures drawn here (the notebook's own pictures cannot be
downloaded).

A revenue bar chart ("introduce this stock"), a book cover (title and author), two similar scenes (what
differs), a scanned text page for OCR, and a sales table (its cells are ``SALES_TABLE``). All are drawn in
this module with Pillow's default font. With the tiny random checkpoint the answers are random words: the
point is that the whole path runs; set ``PHI3V_MODEL`` to the real checkpoint for real answers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict

from PIL import Image, ImageDraw


def revenue_chart() -> Image.Image:
    """A quarterly revenue bar chart of a made-up company (640 x 480)."""
    img = Image.new("RGB", (640, 480), "white")
    draw = ImageDraw.Draw(img)
    draw.text((160, 20), "ACME Corp (ACME) quarterly revenue, $M", fill="black")
    draw.line((60, 420, 600, 420), fill="black", width=2)
    draw.line((60, 60, 60, 420), fill="black", width=2)
    for i, (quarter, revenue) in enumerate([("Q1", 120), ("Q2", 150), ("Q3", 135), ("Q4", 210)]):
        x = 100 + i * 125
        draw.rectangle((x, 420 - revenue * 1.5, x + 70, 420), fill=(40, 90, 200))
        draw.text((x + 25, 430), quarter, fill="black")
        draw.text((x + 20, 400 - revenue * 1.5), str(revenue), fill="black")
    return img


def book_cover() -> Image.Image:
    """A book cover with a title and an author (400 x 600, portrait)."""
    img = Image.new("RGB", (400, 600), (120, 20, 30))
    draw = ImageDraw.Draw(img)
    draw.rectangle((20, 20, 380, 580), outline=(230, 200, 120), width=4)
    draw.text((90, 200), "THE QUIET HARBOUR", fill=(240, 230, 200))
    draw.text((140, 480), "Ada Lindqvist", fill=(240, 230, 200))
    return img


def scene(with_ball: bool) -> Image.Image:
    """A football pitch with two players; ``with_ball`` adds the ball (the one difference)."""
    img = Image.new("RGB", (800, 450), (40, 140, 60))
    draw = ImageDraw.Draw(img)
    draw.line((400, 0, 400, 450), fill="white", width=3)
    draw.ellipse((340, 165, 460, 285), outline="white", width=3)
    for x, colour in ((250, (220, 30, 30)), (560, (240, 240, 240))):
        draw.ellipse((x - 15, 170, x + 15, 200), fill=(230, 190, 150))
        draw.rectangle((x - 20, 200, x + 20, 280), fill=colour)
    if with_ball:
        draw.ellipse((300, 300, 324, 324), fill="white", outline="black")
    return img


TEXT_PAGE = (
    "Chapter 1. The Harbour",
    "",
    "The fishing boats came in before dawn, as they",
    "always did, their lamps swinging over the grey",
    "water. Ada counted them from the sea wall: seven,",
    "then eight, then the late one with the red sail.",
    "",
    "By noon the market smelled of salt and tar, and",
    "the gulls had found every open crate.",
)


def text_page() -> Image.Image:
    """A "scanned" page of printed text (600 x 800): off-white paper, a slight tilt, a little noise."""
    page = Image.new("L", (600, 800), 242)
    draw = ImageDraw.Draw(page)
    for i, line in enumerate(TEXT_PAGE):
        draw.text((60, 80 + i * 28), line, fill=30)
    draw.text((290, 740), "- 1 -", fill=60)
    noise = Image.effect_noise((600, 800), 12).point(lambda v: v // 16)
    scanned = Image.eval(Image.blend(page, noise, 0.08), lambda v: v)
    return scanned.rotate(0.8, resample=Image.Resampling.BICUBIC, fillcolor=242).convert("RGB")


class TableData(TypedDict):
    """A table as drawn: its title, a units note, the column headers and the rows (one value per column)."""

    title: str
    units: str
    columns: list[str]
    rows: list[list[str | int | float]]


SALES_TABLE: TableData = {
    "title": "Quarterly sales by region",
    "units": "(thousand units)",
    "columns": ["Region", "Q1", "Q2", "Q3"],
    "rows": [
        ["North", 120, 135, 150],
        ["South", 95, 110, 102],
        ["East", 143, 128, 160],
        ["West", 88, 97, 115],
        ["Central", 64, 72, 81],
    ],
}


def sales_table() -> Image.Image:
    """``SALES_TABLE`` drawn as a gridded table (640 x 380): title, units note, a shaded header row, five rows.

    The first column is left-aligned, the numbers are centred in their cells.
    """
    table = SALES_TABLE
    img = Image.new("RGB", (640, 380), "white")
    draw = ImageDraw.Draw(img)
    draw.text((40, 24), table["title"], fill="black")
    draw.text((40, 46), table["units"], fill=(90, 90, 90))
    widths = [200] + [120] * (len(table["columns"]) - 1)
    edges = [40]
    for width in widths:
        edges.append(edges[-1] + width)
    top, row_height = 80, 44
    cells: list[list[str]] = [table["columns"], *([str(v) for v in row] for row in table["rows"])]
    bottom = top + row_height * len(cells)
    draw.rectangle((edges[0], top, edges[-1], top + row_height), fill=(225, 230, 240))
    for r, row in enumerate(cells):
        y = top + r * row_height + (row_height - 12) // 2
        for c, text in enumerate(row):
            left, right = edges[c], edges[c + 1]
            x = left + 12 if c == 0 else (left + right - draw.textlength(text)) / 2
            draw.text((x, y), text, fill="black")
    for r in range(len(cells) + 1):
        y = top + r * row_height
        draw.line((edges[0], y, edges[-1], y), fill="black", width=2 if r in (0, 1, len(cells)) else 1)
    for c, x in enumerate(edges):
        draw.line((x, top, x, bottom), fill="black", width=2 if c in (0, len(edges) - 1) else 1)
    return img


@dataclass(frozen=True)
class SeedTask:
    name: str
    question: str
    images: Callable[[], list[Image.Image]]

    @property
    def user_content(self) -> str:
        tags = "".join(f"<|image_{k}|>\n" for k in range(1, len(self.images()) + 1))
        return tags + self.question


SEED_TASKS = (
    SeedTask("stock chart", "Could you please introduce this stock to me?", lambda: [revenue_chart()]),
    SeedTask("book cover", "What is the title of this book, and who is its author?", lambda: [book_cover()]),
    SeedTask("two photos", "What is the difference between these two images?", lambda: [scene(False), scene(True)]),
)

# The demo adds a table, asked in the words of Phi-3-vision's own sample (sample_inference.py on the model card).
DEMO_TASKS = (
    *SEED_TASKS,
    SeedTask("sales table", "Can you convert the table to markdown format?", lambda: [sales_table()]),
)
