"""Constrained decoding: grammars compiled by llguidance, one matcher per request."""
