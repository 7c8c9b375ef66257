"""The L7 gateway in front of the active slot."""
