"""A LangChain agent chains two Phi-3-vision tools through an image handle.

    python examples/agent_chain.py                  # the tiny random model (offline; its words are random)
    PHI3V_MODEL=microsoft/Phi-3-vision-128k-instruct python examples/agent_chain.py

The agent is ``langchain.agents.create_agent`` over the five tools of
:class:`~phi3v_tools.langchain.Phi3VisionToolkit`. Its chat model is scripted here so that the example runs
offline and always takes the same path: it reads the title and author off a book cover (``read_text``), then
compares that cover, named by the handle the first result gave it, with a football scene
(``compare_images``), then answers. The second call reuses the cover's image features instead of encoding
it again ("cached images: 1"). To drive the tools with a real model, pass any tool-calling chat model to
``create_agent`` instead, e.g. ``langchain.chat_models.init_chat_model("openai:gpt-4.1")``.

The pictures are drawn by :mod:`phi3v_tools.demo` and saved to a temporary folder, the only one the tools
may read.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from phi3v_tools.demo import book_cover, scene
from phi3v_tools.langchain import Phi3VisionToolkit
from phi3v_tools.runner import close_runners
from phi3v_tools.settings import Settings

HANDLE = re.compile(r"image://sha256/[0-9a-f]{64}")


class ScriptedVisionAgent(BaseChatModel):
    """A stand-in for a tool-calling chat model: read the cover, compare it (by handle) with the scene, answer."""

    cover: str
    scene: str

    @property
    def _llm_type(self) -> str:
        return "scripted-vision-agent"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedVisionAgent:
        return self  # the script already knows the tools

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        results = [m for m in messages if isinstance(m, ToolMessage)]
        if not results:
            args: dict[str, Any] = {"image": self.cover, "fields": ["title", "author"]}
            reply = AIMessage("", tool_calls=[{"name": "read_text", "args": args, "id": "call_1"}])
        elif len(results) == 1:
            match = HANDLE.search(str(results[0].content))
            if match is None:
                raise RuntimeError(f"read_text gave no image handle: {results[0].content!r}")
            args = {"images": [match.group(0), self.scene], "question": "How do these two pictures differ?"}
            reply = AIMessage("", tool_calls=[{"name": "compare_images", "args": args, "id": "call_2"}])
        else:
            cover_text = str(results[0].content).splitlines()[0]
            comparison = str(results[1].content).splitlines()[0]
            reply = AIMessage(f"The cover reads: {cover_text}. Compared with the football scene: {comparison}")
        return ChatResult(generations=[ChatGeneration(message=reply)])


def show_call(step: int, message: AIMessage) -> None:
    for call in message.tool_calls:
        print(f"{step}. model -> {call['name']}({call['args']})")


def show_result(message: ToolMessage) -> None:
    for line in str(message.content).splitlines():
        print(f"   {message.name} | {line}")
    result = message.artifact
    if result is not None:
        seconds = result.call.seconds.get("total", 0.0)
        print(f"   ({type(result).__name__}; cached images: {result.call.cached_images}; {seconds:.2f} s)")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="phi3v-agent-") as tmp:
        folder = Path(tmp)
        book_cover().save(folder / "cover.png")
        scene(False).save(folder / "scene_a.png")
        # The tiny model unless PHI3V_MODEL names another; local paths are allowed only under `folder`.
        settings = Settings.from_env({"PHI3V_MODEL": "tiny", **os.environ}, allowed_dirs=(folder,))
        tools = Phi3VisionToolkit(settings=settings).get_tools()
        model = ScriptedVisionAgent(cover=str(folder / "cover.png"), scene=str(folder / "scene_a.png"))
        agent = create_agent(model, tools, system_prompt="Use the vision tools to look at images.")
        question = (
            f"What are the title and author of the book whose cover is {folder / 'cover.png'}, and how does "
            f"that cover differ from the picture {folder / 'scene_a.png'}?"
        )
        print(f"model: {settings.model}\nuser: {question}")
        step = 0
        try:
            for update in agent.stream({"messages": [HumanMessage(question)]}, stream_mode="updates"):
                for node in update.values():
                    for message in (node or {}).get("messages", []):
                        if isinstance(message, AIMessage) and message.tool_calls:
                            step += 1
                            show_call(step, message)
                        elif isinstance(message, AIMessage):
                            print(f"Final answer: {message.content}")
                        elif isinstance(message, ToolMessage):
                            show_result(message)
        finally:
            close_runners()


if __name__ == "__main__":
    main()
