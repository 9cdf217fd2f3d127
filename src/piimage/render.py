"""The Jinja2 environment: StrictUndefined, so a missing template variable is an error,
and the plain frozen context every template sees (cluster, network, node, nodes, role, …)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jinja2

from .errors import UserError


def environment(search_path: list[Path] | None = None) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(p) for p in (search_path or [])]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    return env


def render_string(env: jinja2.Environment, text: str, context: Mapping[str, Any], where: str) -> str:
    """Render an inline template (a path, a `when:` expression) with a located error."""
    try:
        return env.from_string(text).render(context)
    except jinja2.TemplateError as e:
        raise UserError(f"{where}: cannot render {text!r}: {e}") from e


def evaluate(env: jinja2.Environment, expr: str, context: Mapping[str, Any], where: str) -> bool:
    try:
        return bool(env.compile_expression(expr, undefined_to_none=False)(**context))
    except jinja2.TemplateError as e:
        raise UserError(f"{where}: cannot evaluate {expr!r}: {e}") from e


def render_file(template: Path, context: Mapping[str, Any], where: str) -> str:
    env = environment([template.parent])
    try:
        return env.get_template(template.name).render(context)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{template}:{e.lineno}: template error: {e.message}") from e
    except jinja2.UndefinedError as e:
        raise UserError(f"{template}: {where}: {e.message}") from e
    except jinja2.TemplateError as e:
        raise UserError(f"{template}: {where}: {e}") from e
