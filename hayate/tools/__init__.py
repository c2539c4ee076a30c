"""Tool calling: per-family formats as data (formats.py), grammars for tool_choice
(grammar.py), the linear-time output parser (parser.py) and its streaming twin (stream.py),
requests' tools checked and planned (request.py), conversations for the template (prompt.py)."""
from hayate.tools.formats import FORMAT_NAMES, FORMATS, ToolFormat, ToolSetup, detect_format, tool_setup
from hayate.tools.parser import CallSyntax, ParsedOutput, ToolCall, parse_output
from hayate.tools.prompt import tool_conversation
from hayate.tools.request import (Tool, ToolChoice, ToolPlan, ToolRequestError, parse_tool_choice, parse_tools,
                                  plan_tools, tool_plan)
from hayate.tools.stream import CallDelta, StreamDelta, ToolCallStream, new_call_id

__all__ = ["FORMAT_NAMES", "FORMATS", "ToolFormat", "ToolSetup", "detect_format", "tool_setup", "CallSyntax",
           "ParsedOutput", "ToolCall", "parse_output", "tool_conversation", "Tool", "ToolChoice", "ToolPlan",
           "ToolRequestError", "parse_tool_choice", "parse_tools", "plan_tools", "tool_plan", "CallDelta",
           "StreamDelta", "ToolCallStream", "new_call_id"]
