"""Why a request is refused: one line each, for the API layer to return as a 4xx."""


class RequestError(ValueError):
    """A request the engine cannot serve as asked (empty prompt, unknown token id, too long)."""


class SamplingError(RequestError):
    """A sampling parameter out of its range."""


class Saturated(Exception):
    """The engine's waiting queue is full: the request is fine, the engine is busy, so this is
    not a :class:`RequestError` (a 400) but a "retry later" (a 429)."""


# How a generation that failed while running (an expert down) begins its error message, so
# that a client of the ``generate`` model tells it from a refusal of the request.
FAILED = "generation failed: "
# How a refusal for saturation (:class:`Saturated`) begins its error message.
SATURATED = "saturated: "
# The delay a saturated engine suggests before a retry (HTTP ``Retry-After``): waiting
# requests start as running ones end, within a generation's time (seconds at most).
RETRY_AFTER_SECONDS = 1
