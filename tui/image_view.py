"""The live stacks as real images, in terminals with a graphics protocol (Kitty, Sixel), through textual-image.

The half-block view (``tui.stack_view``) works everywhere, over ssh and in
tmux; a terminal that speaks the Kitty graphics protocol or Sixel can show the
same stretched preview at its own pixel resolution, where faint stars and
trails are far easier to judge.  Which one the dashboard uses is decided once,
by ``graphics_protocol()``, before the app starts.

The image is made from the same array as the half-block view: the zscale/asinh
stretched preview (``tui.render.display_grey``, row 0 at the bottom), as an
8-bit greyscale PIL image, stretched on a thread worker like the half blocks.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import numpy as np
from textual.app import ComposeResult
from textual.containers import Center, Horizontal, Vertical
from textual.widget import Widget

from observer.state import FilterStatus, TargetState
from tui.quiet import QuietStatic
from tui.render import display_grey
from tui.stack_view import MIN_PANEL_COLS, view_key

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

log = logging.getLogger(__name__)

#: The environment variable that chooses how stacks are drawn (see ``graphics_protocol``).
IMAGE_ENV = "OBSERVER_IMAGE"
PROTOCOLS = ("kitty", "sixel")
CHOICES = ("auto", "halfblock") + PROTOCOLS


def graphics_protocol() -> str | None:
    """The graphics protocol to draw the stacks with ("kitty" or "sixel"), or None for half-block characters.

    Chosen by the environment variable ``OBSERVER_IMAGE``:

    * ``auto`` (the default): what textual-image detects.  It asks the terminal
      (a Sixel device-attributes query and a Kitty graphics query, up to 0.1 s
      each) when stdout is a terminal, so this must run before the Textual app
      starts reading the keyboard (``ObserverApp.__init__`` calls it).  Not a
      terminal (tests, pipes), no answer (tmux without Sixel, a slow ssh link)
      or no textual-image installed: half blocks.
    * ``halfblock``: half-block characters, and the terminal is never queried.
      The choice for a terminal that claims a protocol but draws it badly
      (textual-image reports glitches with Sixel under some tmux versions).
    * ``kitty`` or ``sixel``: that protocol, whatever the terminal says.

    An unknown value is logged and treated as ``auto``.
    """
    choice = os.environ.get(IMAGE_ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        log.warning("%s=%s is not one of %s; using auto", IMAGE_ENV, choice, "|".join(CHOICES))
        choice = "auto"
    if choice == "halfblock":
        return None
    try:
        from textual_image import renderable    # importing it runs the terminal detection
    except ImportError as exc:
        log.warning("textual-image is not available (%s): stacks drawn with half blocks", exc)
        return None
    if choice in PROTOCOLS:
        return choice
    detected = {renderable.TGPImage: "kitty", renderable.SixelImage: "sixel"}.get(renderable.Image)
    log.info("terminal graphics: %s", detected or "none detected, half blocks")
    return detected


#: Grey levels of a Sixel picture: textual-image encodes it on the UI thread when it is drawn; 64 levels
#: (smooth to the eye; the half blocks use 32) made it a third of the bytes of 256 levels (140 kB instead
#: of 390 kB for a 360 px panel, which matters over ssh) and about a third faster to encode (~80 ms).
SIXEL_COLOURS = 64


def make_image_widget(protocol: str) -> Widget:
    """textual-image's widget for a protocol (Kitty's is called TGP, the Terminal Graphics Protocol)."""
    from textual_image.widget import SixelImage, SixelOptions, TGPImage

    if protocol == "kitty":
        return TGPImage()
    return SixelImage(sixel_options=SixelOptions(colors=SIXEL_COLOURS))


def preview_image(preview: np.ndarray) -> PILImage:
    """The stretched preview as an 8-bit greyscale PIL image, row 0 of the array at the bottom."""
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(display_grey(preview)), mode="L")


class FilterPanel(Vertical):
    """One filter: a title line and the image, centred in the space under it."""

    DEFAULT_CSS = """
    FilterPanel { width: 1fr; height: 1fr; }
    FilterPanel > .title { height: 1; text-style: bold; }
    FilterPanel > .title.selected { text-style: bold reverse; }
    FilterPanel > .note { height: 1; color: $text-muted; }
    FilterPanel > Center { height: 1fr; align: center middle; }
    FilterPanel > Center > * { width: auto; height: auto; }
    """

    def __init__(self, protocol: str) -> None:
        super().__init__()
        # Made here, not in compose, so they can be updated before the panel is mounted.
        self.heading = QuietStatic("", classes="title")
        self.note = QuietStatic("waiting for frames", classes="note")
        self.image_widget = make_image_widget(protocol)
        self.preview: np.ndarray | None = None    # the array shown (or being converted)
        self.image: PILImage | None = None        # what the image widget was given last (for tests)

    def compose(self) -> ComposeResult:
        yield self.heading
        yield self.note
        with Center():
            yield self.image_widget

    def set_image(self, preview: np.ndarray | None, image: PILImage | None) -> None:
        """The converted preview arrives (UI thread); ignored if a newer preview was asked for meanwhile."""
        if preview is not self.preview:
            return
        self.image = image
        self.image_widget.image = image
        if image is None:
            self.note.show("waiting for frames" if preview is None else "cannot draw this preview")
        if self.note.display != (image is None):
            self.note.display = image is None


class StackImages(Horizontal):
    """The stack (or last raw frame) of each filter of one target, as images; same interface as StackView."""

    DEFAULT_CSS = """
    StackImages { width: 1fr; height: 1fr; }
    StackImages > FilterPanel { margin-left: 1; }
    StackImages > FilterPanel:first-child { margin-left: 0; }
    StackImages > .empty { color: $text-muted; }
    """

    def __init__(self, protocol: str, *, id: str | None = None) -> None:  # noqa: A002 - Textual's own name
        super().__init__(id=id)
        self.protocol = protocol
        self.target_state: TargetState | None = None
        self.filter_name: str | None = None
        self.mode = "stack"                       # "stack" or "raw"
        self.drawn_filters: list[str] = []        # the panels shown (for tests)
        self.panels: dict[str, FilterPanel] = {}
        self._key: tuple = ()
        self._converting = 0

    def compose(self) -> ComposeResult:
        yield QuietStatic("no target yet: waiting for science frames", classes="empty")

    @property
    def pending(self) -> bool:
        """True while a preview is being converted off the UI thread."""
        return bool(self._converting)

    def show(self, target: TargetState | None, filter_name: str | None, mode: str) -> None:
        """Display a target's previews; only what changed is touched (see ``view_key``)."""
        key = view_key(target, filter_name, mode)
        self.target_state, self.filter_name, self.mode = target, filter_name, mode
        if key != self._key:
            self._key = key
            self._arrange()

    def on_resize(self) -> None:
        self._arrange()

    def _arrange(self) -> None:
        """Panels for the filters that fit side by side (only the selected one when narrow), each up to date."""
        target = self.target_state
        names = list(target.filters) if target is not None else []
        empty = self.query_one(".empty")
        if empty.display != (not names):
            empty.display = not names
        if names:
            selected = self.filter_name if self.filter_name in target.filters else names[0]
            width = self.size.width
            if width and width // len(names) < MIN_PANEL_COLS:
                names = [selected]
            for name in names:
                if name not in self.panels:
                    self.panels[name] = FilterPanel(self.protocol)
                    self.mount(self.panels[name])
                self._update_panel(self.panels[name], target.filters[name], name == selected)
        for name, panel in self.panels.items():
            if panel.display != (name in names):
                panel.display = name in names
        self.drawn_filters = names

    def _update_panel(self, panel: FilterPanel, status: FilterStatus, selected: bool) -> None:
        preview = status.stack_preview if self.mode == "stack" else status.raw_preview
        what = f"{status.n_stacked} stacked" if self.mode == "stack" else "last raw frame"
        panel.heading.show(f" {status.filter}: {what} ")
        panel.heading.set_class(selected, "selected")
        if preview is not None and preview.size == 0:
            preview = None
        if preview is panel.preview:
            return
        panel.preview = preview
        if preview is None:
            panel.set_image(None, None)
        else:
            if panel.image is None:
                panel.note.show("drawing ...")
            self._convert(panel, preview)

    def _convert(self, panel: FilterPanel, preview: np.ndarray) -> None:
        """Stretch on a thread worker (numpy on the UI thread waits for the GIL behind the reduction)."""
        self._converting += 1

        def work() -> None:
            try:
                image = preview_image(preview)
            except Exception:  # a bad preview must not leave the panel waiting forever
                log.exception("cannot draw a %s preview", self.mode)
                image = None
            self.app.call_from_thread(self._converted, panel, preview, image)

        self.run_worker(work, thread=True, group="stack-image", exit_on_error=False)

    def _converted(self, panel: FilterPanel, preview: np.ndarray, image: PILImage | None) -> None:
        self._converting -= 1
        panel.set_image(preview, image)
