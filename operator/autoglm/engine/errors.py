"""Why a request is refused: one line each, for the API layer to return as a 4xx."""


class RequestError(ValueError):
    """A request the engine cannot serve as asked (empty prompt, unknown token id, too long)."""


class SamplingError(RequestError):
    """A sampling parameter out of its range."""


# How a generation that failed while running (an expert down) begins its error message, so
# that a client of the ``generate`` model tells it from a refusal of the request.
FAILED = "generation failed: "
