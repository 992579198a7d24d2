"""Widgets that redraw only when their content changed, and re-lay out the screen only when their size did.

A ``Static.update()`` asks for a layout pass of the whole screen by default.
During a burst of frames every snapshot updated six labels and the header that
way: each pass cost 30-70 ms of UI-thread CPU, stretched by sharing the GIL
with the reduction, and keys pressed meanwhile answered in over 100 ms
(bench/dashboard.py).  Most snapshots change none of these texts, and when one
changes its height rarely does, so a repaint of the widget alone is enough.
"""

from __future__ import annotations

from textual.visual import VisualType
from textual.widgets import Header, Static
from textual.widgets._header import HeaderTitle  # the class Header composes; only reachable here


class QuietStatic(Static):
    """A ``Static`` whose ``show`` skips unchanged content and lays out only when the height changes."""

    def __init__(self, content: VisualType = "", *, id: str | None = None,  # noqa: A002 - Textual's name
                 classes: str | None = None) -> None:
        super().__init__(content, id=id, classes=classes)
        self._key: object = content if isinstance(content, str) else object()

    def show(self, content: VisualType, key: object = None) -> bool:
        """Display ``content`` unless ``key`` (default: the content itself) equals the last one's; True if redrawn.

        The height is what a layout pass could change (the width comes from the
        container), so the content's height at the current width is compared
        before and after, and a layout pass asked for only when it differs.
        """
        key = content if key is None else key
        if key == self._key:
            return False
        self._key = key
        width = self.content_size.width
        if not self.is_mounted or not width or self.parent is None:
            self.update(content)
            return True
        container, viewport = self.parent.size, self.app.size
        before = self.get_content_height(container, viewport, width)
        self.update(content, layout=False)
        if self.get_content_height(container, viewport, width) != before:
            self.refresh(layout=True)
        return True


class _OneLineTitle(HeaderTitle):
    """The header's title: one line (``text-wrap: nowrap``) in a fixed-height header, so never a layout pass."""

    def update(self, content: VisualType = "", *, layout: bool = False) -> None:
        super().update(content, layout=False)


class QuietHeader(Header):
    """Textual's ``Header`` whose title/sub-title changes repaint the title only (see the module docstring)."""

    def compose(self):  # noqa: ANN201 - Header.compose's own result type
        for widget in super().compose():
            yield _OneLineTitle() if type(widget) is HeaderTitle else widget
