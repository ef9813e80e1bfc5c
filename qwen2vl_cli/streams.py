"""An answer's text as it grows: handed on as it becomes final, ending before a stop string
(OpenAI's `stop`) with what could start one held back."""

from __future__ import annotations

from collections.abc import Callable


class StopText:
    """An answer's text handed on as it grows, ending before the first of `stops` (OpenAI's
    `stop`, trimmed as OpenAI trims it): what could be the start of one is held back until it is
    not; `stopped` says one was found, `sent` is the text so far."""

    def __init__(self, on_text: Callable[[str], None] | None, stops: tuple[str, ...] = ()):
        self.on_text, self.stops = on_text, stops
        self.sent = ""
        self.stopped = False
        self._hold = max(map(len, stops), default=1) - 1

    def feed(self, text: str, final: bool = False) -> None:
        """`text`: the whole answer so far; `final`: nothing follows it."""
        if self.stopped:
            return
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            text, self.stopped, final = text[: min(found)], True, True
        if not final:
            text = text[: max(len(self.sent), len(text) - self._hold)]
        if text.startswith(self.sent) and len(text) > len(self.sent):
            chunk, self.sent = text[len(self.sent) :], text
            if self.on_text is not None:
                self.on_text(chunk)
        elif final:
            self.sent = text


class TextStream(StopText):
    """Text of a growing token list, handed on as it becomes final (a character cut between two
    tokens waits for the next), ending before a stop string."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None, stops: tuple[str, ...] = ()):
        super().__init__(on_text, stops)
        self.tokenizer = tokenizer

    def update(self, tokens: list[int], final: bool = False) -> None:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        self.feed(text if final else text.rstrip("\ufffd"), final)

    def tokens_to_stop(self, tokens: list[int]) -> list[int]:
        """The fewest of `tokens` whose text holds a stop string (once `stopped`)."""
        low, high = 1, len(tokens)
        while low < high:
            middle = (low + high) // 2
            text = self.tokenizer.decode(tokens[:middle], skip_special_tokens=True)
            if any(s in text for s in self.stops):
                high = middle
            else:
                low = middle + 1
        return tokens[:low]
