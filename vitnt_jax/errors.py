"""The one base class of the errors a user can cause and fix, and how a command line words them.

A library error names the settings it is about by their Python names (`batch_size`, `images`); a
command line renders the same error with its own flag names (`--batch-size`, `--images`) through
`UserError.render`, so the library never hard-codes a flag and every command words it its own way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping


class UserError(Exception):
    """A problem the user can fix; the message is one sentence naming the thing and the fix.

    message: may hold placeholders `{name}` for `field` and each of `also`, where a setting's name
    goes; `str()` puts the Python names there, `render` the names a command line gives them.
    `field` is the setting the error is about (None: no single one).
    """

    def __init__(self, message: str, *, field: str | None = None, also: tuple[str, ...] = ()):
        self.template, self.field, self.fields = message, field, tuple(x for x in (field, *also) if x)
        super().__init__(self.render({}))

    def render(self, names: Mapping[str, str] | Callable[[str], str]) -> str:
        """Returns the message with every setting named by `names` (a mapping or a function, e.g. to its flag).

        A setting a mapping does not hold keeps its own name.
        """
        text = self.template
        for name in self.fields:
            shown = names(name) if callable(names) else names.get(name, name)
            text = text.replace("{" + name + "}", shown)
        return text
