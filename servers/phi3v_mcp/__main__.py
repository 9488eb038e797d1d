"""``python -m phi3v_mcp [--transport stdio|http]``: the MCP server, configured from ``PHI3V_*`` variables."""

import argparse
import logging
import sys

from phi3v_tools.errors import Phi3VToolsError, install_command
from phi3v_tools.settings import Settings
from phi3v_tools.signals import ending_line, exit_status, terminate_as_interrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m phi3v_mcp",
        description="Serve the phi3v-tools vision tools over MCP. Settings come from PHI3V_* environment "
        "variables (PHI3V_MODEL, PHI3V_ALLOWED_DIRS, PHI3V_ALLOW_URLS, PHI3V_MCP_HOST, PHI3V_MCP_PORT, "
        "PHI3V_MCP_TOKEN, PHI3V_MCP_MAX_BODY_MB, PHI3V_MCP_SHUTDOWN_GRACE_S, PHI3V_MCP_MAX_SESSIONS, "
        "PHI3V_MCP_SESSION_IDLE_S, PHI3V_MCP_MAX_CONNECTIONS, PHI3V_MCP_HEADER_TIMEOUT_S, PHI3V_MCP_BODY_TIMEOUT_S, "
        "PHI3V_MCP_KEEP_ALIVE_S); see servers/README.md.",
    )
    parser.add_argument(
        "--transport",
        choices=("stdio", "http"),
        default="stdio",
        help="stdio (default; for clients that start the server) or http (streamable HTTP at /mcp)",
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        sys.stderr.write(f"phi3v_mcp: {exc}\n")  # stdout belongs to the protocol
        return 1  # a start-up failure, as servers/README.md documents (2 is argparse's, for bad flags)

    try:
        with terminate_as_interrupt():
            try:
                from phi3v_mcp.server import run
            except ModuleNotFoundError as exc:  # the mcp extra is missing
                sys.stderr.write(
                    f"phi3v_mcp: the MCP server cannot start ({exc}); install it with: {install_command('mcp')}\n"
                )
                return 1
            run(settings, args.transport)
    except KeyboardInterrupt as stop:  # Ctrl-C: 130; SIGTERM (signals.Terminated): 143, after a graceful drain
        sys.stderr.write(ending_line("phi3v_mcp", stop) + "\n")
        return exit_status(stop)
    except Exception as exc:  # a start-up failure (model not found, port in use): one line, no traceback
        cause = _expected(exc)
        if cause is None:
            raise
        logging.getLogger("phi3v_mcp").debug("start-up failed", exc_info=True)
        sys.stderr.write(f"phi3v_mcp: {cause}\n")
        return 1
    return 0


def _expected(exc: BaseException) -> BaseException | None:
    """The Phi3VToolsError or OSError behind ``exc``, looking through exception groups and causes."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, Phi3VToolsError | OSError):
            return current
        todo.extend(getattr(current, "exceptions", ()))
        todo.extend(linked for linked in (current.__cause__, current.__context__) if linked is not None)
    return None


if __name__ == "__main__":
    sys.exit(main())
