"""Generate the reference of every TOKENRELAY_* setting from worker.settings.WorkerSettings and
api_client.gateway.settings.GatewaySettings.

Writes docs/configuration.md and the tables between the config-table markers (worker) and the
gateway-config-table markers (gateway) in README.md;
`--check` writes nothing and exits 1 when either file is stale (tests/test_docs.py runs the same check)."""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python scripts/gen_config_docs.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from annotated_types import Ge, Gt, Le, Lt  # noqa: E402  (after the sys.path fix above)
from pydantic.fields import FieldInfo  # noqa: E402
from pydantic_settings import BaseSettings  # noqa: E402

from api_client.gateway.settings import GatewaySettings  # noqa: E402
from worker.settings import ENV_PREFIX, WorkerSettings  # noqa: E402

README = REPO_ROOT / "README.md"
CONFIG_PAGE = REPO_ROOT / "docs" / "configuration.md"
START_MARKER = "<!-- config-table:start -->"
END_MARKER = "<!-- config-table:end -->"
GATEWAY_START_MARKER = "<!-- gateway-config-table:start -->"
GATEWAY_END_MARKER = "<!-- gateway-config-table:end -->"
# Section comments in the settings class, e.g. `# ---- Redis ------`: they group the tables.
_SECTION_RE = re.compile(r"^\s*#\s*-{2,}\s*(?P<title>.+?)\s*-{2,}\s*$")
_FIELD_RE = re.compile(r"^\s+(?P<name>[a-z_][a-z0-9_]*)\s*:")
# `# <Base>'s knobs come in here ...`: the fields the class inherits are listed at that line.
_INHERITED_RE = re.compile(r"^\s*#.*\bcome in here\b")
_BOUNDS = ((Gt, "gt", ">"), (Ge, "ge", ">="), (Lt, "lt", "<"), (Le, "le", "<="))
# Defaults that depend on the machine: a stable description instead of this machine's value.
_COMPUTED_DEFAULTS = {"consumer": "host name"}


def sections(settings_cls: type[BaseSettings] = WorkerSettings) -> list[tuple[str, list[str]]]:
    """(section title, field names) in source order; fields before any section comment go under
    "General", and fields the source scan cannot place (e.g. inherited) are appended under "Other"."""
    groups: list[tuple[str, list[str]]] = []
    placed: set[str] = set()
    fields = settings_cls.model_fields
    try:
        source = inspect.getsource(settings_cls).splitlines()
    except (OSError, TypeError):  # a class made at run time: one group in field order
        source = []
    own = set(settings_cls.__annotations__)
    for line in source:
        if section := _SECTION_RE.match(line):
            groups.append((section["title"], []))
        elif _INHERITED_RE.match(line) and groups:
            inherited = [name for name in fields if name not in own and name not in placed]
            groups[-1][1].extend(inherited)
            placed.update(inherited)
        elif (field := _FIELD_RE.match(line)) and field["name"] in fields and field["name"] not in placed:
            if not groups:
                groups.append(("General", []))
            groups[-1][1].append(field["name"])
            placed.add(field["name"])
    rest = [name for name in fields if name not in placed]
    if rest:
        groups.append(("Other", rest))
    return [(title, names) for title, names in groups if names]


def type_text(field: FieldInfo) -> str:
    """The accepted values: `int >= 1`, `int, 0 to 65535`, `fcfs | priority`, `str (optional)`."""
    annotation = field.annotation
    optional = False
    args = typing.get_args(annotation)
    if type(None) in args:  # X | None
        optional = True
        rest = [a for a in args if a is not type(None)]
        annotation = rest[0] if len(rest) == 1 else annotation
    if typing.get_origin(annotation) is typing.Literal:
        text = " | ".join(str(v) for v in typing.get_args(annotation))
    else:
        text = getattr(annotation, "__name__", str(annotation))
    bounds = {symbol: getattr(meta, attr) for meta in field.metadata
              for cls, attr, symbol in _BOUNDS if isinstance(meta, cls)}
    if ">=" in bounds and "<=" in bounds:
        text += f", {bounds['>=']} to {bounds['<=']}"
    elif bounds:
        text += " " + " and ".join(f"{symbol} {value}" for symbol, value in bounds.items())
    return f"{text} (optional)" if optional else text


def default_text(name: str, field: FieldInfo) -> str:
    if field.default_factory is not None:
        return _COMPUTED_DEFAULTS.get(name, "computed")
    value: Any = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):  # as an environment variable spells it
        return "`true`" if value else "`false`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render_tables(settings_cls: type[BaseSettings] = WorkerSettings, heading_level: int = 3) -> str:
    """One markdown table per settings section: variable, default, accepted values, description."""
    fields = settings_cls.model_fields
    parts: list[str] = []
    for title, names in sections(settings_cls):
        parts.append(f"{'#' * heading_level} {title[:1].upper()}{title[1:]}\n")
        parts.append("| variable | default | values | what |")
        parts.append("| --- | --- | --- | --- |")
        for name in names:
            field = fields[name]
            parts.append(f"| `{ENV_PREFIX}{name.upper()}` | {default_text(name, field)} | "
                         f"{_cell(type_text(field))} | {_cell(field.description or '')} |")
        parts.append("")
    return "\n".join(parts).rstrip("\n") + "\n"


def render_page(settings_cls: type[BaseSettings] = WorkerSettings) -> str:
    """The whole of docs/configuration.md."""
    return f"""<!-- Generated by scripts/gen_config_docs.py from worker/settings.py: edit those, not this file. -->
# Configuration of `python -m worker`

Every setting is an environment variable with the prefix `{ENV_PREFIX}` (names are not case
sensitive). `python -m worker --help` prints the same list. With Docker Compose, put them in a `.env`
file beside `compose.yaml` or in the service's `environment:`.

Notes:

- Variables the worker does not know are ignored, so a misspelt name has no effect: compare with
  `python -m worker --help` when a setting seems not to apply.
- An invalid value stops the worker before it loads the model: exit code 2 and a message naming the
  setting. Besides the bounds below: `BLOCK_MS` must be under half of `SOCKET_TIMEOUT_S`,
  `HEARTBEAT_TTL_S` at least 1, `CONSUMER` free of whitespace, `PREFIX` free of whitespace and
  `* ? [ ]`, and `REDIS_URL` a `redis://`, `rediss://` or `unix://` URL.
- The engine knobs are checked by `engine.EngineConfig` when the engine starts: `BLOCK_SIZE` is one
  of 8, 16, 32, 64, 128, and `MAX_NUM_BATCHED_TOKENS` must be at least `MAX_NUM_SEQS`.
- Several workers serve one queue when they share `REDIS_URL` and `PREFIX` and each has its own
  `CONSUMER` name.
- "unset" means the variable is absent; the description says what happens then.

{render_tables(settings_cls, heading_level=2)}
# Configuration of `python -m api_client.gateway`

The OpenAI-compatible gateway reads the same way (`python -m api_client.gateway --help`). `REDIS_URL`
and `PREFIX` must name the workers' queue; its own settings start with `GATEWAY_`, so one `.env` can
hold both. An invalid value stops it with exit code 2.

{render_tables(GatewaySettings, heading_level=2)}"""


def splice(readme: str, tables: str, start_marker: str = START_MARKER, end_marker: str = END_MARKER) -> str:
    """`readme` with the text between the markers (the worker's config-table ones by default)
    replaced by `tables`."""
    start, end = readme.find(start_marker), readme.find(end_marker)
    if start < 0 or end < 0 or end < start or readme.count(start_marker) != 1 or readme.count(end_marker) != 1:
        raise ValueError(f"README.md must hold exactly one {start_marker} followed by one {end_marker}; "
                         "put them where the configuration table belongs")
    head = readme[:start + len(start_marker)]
    return f"{head}\n{tables}{readme[end:]}"


def render_readme(readme: str) -> str:
    """README.md with both generated tables current."""
    readme = splice(readme, render_tables())
    return splice(readme, render_tables(GatewaySettings, heading_level=4), GATEWAY_START_MARKER, GATEWAY_END_MARKER)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file is stale")
    args = parser.parse_args(argv)
    wanted = {README: render_readme(README.read_text(encoding="utf-8")), CONFIG_PAGE: render_page()}
    stale = [path for path, text in wanted.items()
             if not path.exists() or path.read_text(encoding="utf-8") != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(REPO_ROOT)} is stale: run python scripts/gen_config_docs.py", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(wanted[path], encoding="utf-8")
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
