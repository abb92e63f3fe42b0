"""models.text errors.

::

    models.errors.ModelError
    ├── InvalidInputError ("invalid_argument")
    │   └── TextInputError             a text request breaks a limit (each case its own class)
    │       ├── EmptyInputError        the request holds no texts at all
    │       ├── EmptyTextError         one text is empty or only whitespace
    │       ├── InvalidUtf8Error       one text is not valid UTF-8
    │       ├── TooManyTextsError      more texts than the per-request cap
    │       ├── TextTooLargeError      one text has more bytes than the per-text cap
    │       └── RequestTooLargeError   the texts together exceed the per-request byte cap
    ├── ModelLoadError ("unavailable")
    │   └── BundleFormatError          a model bundle is malformed (bad magic, sizes, members)
    └── ModelBuildError                the MiniLM build failed: weights missing or changed,
                                       output digest differs from the recorded one

Over the RPC each case travels as its own refined code (``invalid_argument.too_many_texts``...),
which the client maps back to the same class (:func:`models.errors.error_from_code`).

Every :class:`TextInputError` names the offending text by its index (``index``, ``None`` when
the request as a whole is at fault), so a client can point at the text that broke the rule; the
error never echoes the text itself (it may be confidential).
"""

from __future__ import annotations

from models.errors import InvalidInputError, ModelError, ModelLoadError

__all__ = [
    "TextInputError",
    "EmptyInputError",
    "EmptyTextError",
    "InvalidUtf8Error",
    "TooManyTextsError",
    "TextTooLargeError",
    "RequestTooLargeError",
    "BundleFormatError",
    "ModelBuildError",
]


class TextInputError(InvalidInputError):
    """A text request breaks one of the request limits (the caller's fault).

    Attributes:
        index: position of the offending text in the request, or ``None`` when the request as
            a whole is at fault.
    """

    code = "invalid_argument.text"

    def __init__(self, message: str, *, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class EmptyInputError(TextInputError):
    """The request holds no texts."""

    code = "invalid_argument.empty_input"


class EmptyTextError(TextInputError):
    """A text is empty or holds only whitespace (it would embed to the [CLS]/[SEP] tokens alone)."""

    code = "invalid_argument.empty_text"


class InvalidUtf8Error(TextInputError):
    """A text's bytes are not valid UTF-8."""

    code = "invalid_argument.invalid_utf8"


class TooManyTextsError(TextInputError):
    """The request holds more texts than the per-request cap."""

    code = "invalid_argument.too_many_texts"


class TextTooLargeError(TextInputError):
    """One text is larger (in UTF-8 bytes) than the per-text cap."""

    code = "invalid_argument.text_too_large"


class RequestTooLargeError(TextInputError):
    """The texts of one request together exceed the per-request byte cap."""

    code = "invalid_argument.request_too_large"


class BundleFormatError(ModelLoadError):
    """A model bundle is malformed: bad magic or version, a size out of bounds, a member
    missing, unknown or failing its digest."""


class ModelBuildError(ModelError):
    """Building the MiniLM model failed: the weights package is missing or not the expected
    one, or the built model's SHA-384 differs from the recorded constant."""
