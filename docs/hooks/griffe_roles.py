"""griffe extension: render the Sphinx roles of kdseg's docstrings in the API page.

kdseg's docstrings name other objects with Sphinx roles (``:func:`masked_mean```,
``:class:`~kdseg.losses.base.Term```). This turns each into an optional cross-reference:
a link where the object is documented in the site, plain code where it is not.
"""
from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):`(~?)([\w.]+)`")


def _target(name: str, obj: griffe.Object) -> str:
    if name.startswith("kdseg.") or name == "kdseg":
        return name
    module = obj if obj.is_module else obj.module
    return f"{module.path}.{name}"


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is None:
            return

        def link(match: re.Match) -> str:
            short, name = match.groups()
            title = name.rsplit(".", 1)[-1] if short else name
            return f'<autoref identifier="{_target(name, obj)}" optional><code>{title}</code></autoref>'

        obj.docstring.value = ROLE.sub(link, obj.docstring.value)
