"""The seed notebook's three tasks, and a table, through the tools instead of raw ``generate`` calls.

    python examples/seed_tools.py                 # the tiny random model (offline; random words)
    PHI3V_MODEL=microsoft/Phi-3-vision-128k-instruct python examples/seed_tools.py

The pictures come from ``phi3v_tools.demo`` and are saved to a temporary folder, the only one the tools may
read. Each tool returns a pydantic result: ``to_text()`` for people, ``model_dump_json()`` for programs.
"""

import os
import tempfile
from pathlib import Path

from phi3v_tools.api import toolbox_from_settings
from phi3v_tools.demo import book_cover, revenue_chart, sales_table, scene
from phi3v_tools.settings import Settings

with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp)
    revenue_chart().save(folder / "chart.png")
    book_cover().save(folder / "cover.png")
    scene(False).save(folder / "scene_a.png")
    scene(True).save(folder / "scene_b.png")
    sales_table().save(folder / "table.png")

    # PHI3V_* variables win over these defaults; local images are read only under `folder`.
    settings = Settings.from_env({"PHI3V_MODEL": "tiny", **os.environ}, allowed_dirs=(folder,))
    tools = toolbox_from_settings(settings)

    # 1. A chart: "Could you please introduce this stock to me?"
    chart = tools.describe_image(folder / "chart.png", question="Could you please introduce this stock to me?")
    print("## stock chart\n" + chart.to_text())

    # 2. A book cover: its title and author, as named fields.
    cover = tools.read_text(folder / "cover.png", fields=["title", "author"])
    print("\n## book cover\n" + cover.to_text())

    # 3. Two photos: what differs. The result also lists image handles for follow-up calls.
    scenes = tools.compare_images([folder / "scene_a.png", folder / "scene_b.png"])
    print("\n## two photos\n" + scenes.to_text())

    # 4. A table, as data: exactly the columns asked for, one cell per column in every row.
    table = tools.read_table(folder / "table.png", columns=["Region", "Q1", "Q2"])
    print("\n## sales table\n" + table.to_csv(), end="")
    print(f"\n(model {scenes.call.model}; images: {', '.join(i.handle[:27] + '...' for i in scenes.images)})")
