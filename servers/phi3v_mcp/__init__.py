"""The phi3v-tools MCP server (MCP Python SDK 2.x): the vision tools over stdio or streamable HTTP."""
