"""A request's tools and tool_choice, checked, and what they make of it: the tools the chat
template sees, the grammar the output must follow, and whether the output is parsed for calls.

tool_choice "none" gives 0 calls whatever the model writes: the output is never parsed for
calls (text that looks like one stays content), the template is not shown the tools, and the
format's trigger token, when it is one, gets a -100 logit bias (over any the client set)."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from hayate.sampling import SamplingParams
from hayate.structured.limits import check_schema
from hayate.structured.spec import GrammarError, GrammarSpec
from hayate.tools.formats import ToolSetup
from hayate.tools.grammar import tool_grammar
from hayate.tools.parser import CallSyntax, ParsedOutput, parse_output

MAX_TOOLS = 128                                 # GroqCloud's limit (the server checks it first)
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")       # OpenAI's rule for function names (fullmatch)
CHOICES = ("none", "auto", "required")
BANNED = -100.0


class ToolRequestError(ValueError):
    """A bad tools / tool_choice field; `param` names it as OpenAI's errors do."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict
    description: str | None = None
    strict: bool = False

    def as_openai(self) -> dict:
        """The tool as chat templates take it (OpenAI's shape)."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}


@dataclass(frozen=True)
class ToolChoice:
    mode: str                  # "none" | "auto" | "required"
    name: str | None = None    # a named choice: "required", with this tool only


@dataclass(frozen=True)
class ToolPlan:
    choice: ToolChoice
    tools: list[Tool]
    template_tools: list[dict] | None   # what the chat template is given
    grammar: GrammarSpec | None
    syntax: CallSyntax | None           # parse the output for calls with it (None: never)
    banned_token_id: int | None = None

    def calls_in(self, text: str, finish_reason: str | None) -> ParsedOutput | None:
        """A finished answer's content and calls; None when it made none, or was cut short (a
        truncated call is never presented as complete)."""
        if self.syntax is None or finish_reason != "stop":
            return None
        parsed = parse_output(text, self.syntax)
        return parsed if parsed.calls else None

    def apply(self, params: SamplingParams) -> SamplingParams:
        """The request's sampling parameters with the tool grammar and the banned trigger."""
        bias = dict(params.logit_bias)
        if self.banned_token_id is not None:
            bias[self.banned_token_id] = BANNED
        return dataclasses.replace(params, grammar=self.grammar or params.grammar, logit_bias=bias)


def parse_tools(tools: list[dict] | None) -> list[Tool]:
    """OpenAI's `tools` list to Tools; ToolRequestError naming the bad field."""
    if not tools:
        return []
    if len(tools) > MAX_TOOLS:
        raise ToolRequestError(f"at most {MAX_TOOLS} tools, got {len(tools)}", "tools")
    parsed: list[Tool] = []
    for index, tool in enumerate(tools):
        parsed.append(_tool(tool, f"tools[{index}]"))
        if parsed[-1].name in (t.name for t in parsed[:-1]):
            raise ToolRequestError(f"two tools are named {parsed[-1].name!r}", f"tools[{index}].function.name")
    return parsed


def _tool(tool: dict, param: str) -> Tool:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or tool.get("type", "function") != "function":
        raise ToolRequestError('a tool must be {"type": "function", "function": {"name": ...}}', param)
    name = function.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ToolRequestError("a function name must be 1 to 64 letters, digits, underscores or dashes, "
                               f"got {name!r}", f"{param}.function.name")
    parameters = function.get("parameters")
    parameters = {"type": "object", "properties": {}} if parameters is None else parameters
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise ToolRequestError("parameters must be a JSON schema of an object", f"{param}.function.parameters")
    try:
        check_schema(parameters)
    except GrammarError as error:
        raise ToolRequestError(str(error), f"{param}.function.parameters") from None
    description = function.get("description")
    return Tool(name, parameters, description if isinstance(description, str) else None,
                function.get("strict") is True)


def parse_tool_choice(value: str | dict | None, tools: list[Tool]) -> ToolChoice:
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(value, str):
        if value not in CHOICES:
            raise ToolRequestError(f"tool_choice must be none, auto, required or a named function, got {value!r}",
                                   "tool_choice")
        choice = ToolChoice(value)
    else:
        function = value.get("function") if value.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise ToolRequestError('a named tool_choice is {"type": "function", "function": {"name": ...}}',
                                   "tool_choice")
        if name not in (tool.name for tool in tools):
            raise ToolRequestError(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        choice = ToolChoice("required", name)
    if choice.mode != "none" and not tools:
        raise ToolRequestError(f"tool_choice {value if isinstance(value, str) else 'named'} needs tools",
                               "tool_choice")
    return choice


def plan_tools(setup: ToolSetup, tools: list[Tool], choice: ToolChoice, parallel: bool) -> ToolPlan | None:
    """What the tools make of a request; None without tools (a plain chat request)."""
    if not tools:
        return None
    if choice.mode == "none":
        return ToolPlan(choice, tools, None, None, None, setup.trigger_token_id)
    offered = [tool for tool in tools if choice.name in (None, tool.name)]
    return ToolPlan(choice, tools, [tool.as_openai() for tool in tools] if setup.native else None,
                    GrammarSpec("lark", grammar_source(setup, offered, choice.mode, parallel)),
                    CallSyntax.of(setup.format, setup.hidden, frozenset(tool.name for tool in offered)))


def grammar_source(setup: ToolSetup, tools: list[Tool], mode: str, parallel: bool) -> str:
    return tool_grammar(setup.format, [(t.name, t.parameters, t.strict) for t in tools], mode, parallel,
                        setup.token_ids)


def bad_tool(setup: ToolSetup, tools: list[Tool], compile_grammar) -> ToolRequestError | None:
    """Which tool's schema the compiler refuses (after the whole set was refused), as the
    error to answer with; None if each compiles alone."""
    for index, tool in enumerate(tools):
        try:
            compile_grammar(GrammarSpec("lark", grammar_source(setup, [tool], "required", False)))
        except GrammarError as error:
            return ToolRequestError(f"tools[{index}].function.parameters: {error}",
                                    f"tools[{index}].function.parameters")
    return None


def tool_plan(setup: ToolSetup, tools: list[dict] | None, tool_choice: str | dict | None,
              parallel: bool = True) -> ToolPlan | None:
    """From OpenAI's fields; ToolRequestError (a ValueError) naming the bad one."""
    parsed = parse_tools(tools)
    return plan_tools(setup, parsed, parse_tool_choice(tool_choice, parsed), parallel)
