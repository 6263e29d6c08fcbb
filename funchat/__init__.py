"""funchat: serving cluster for Fun-Audio-Chat (speech in, text and speech out)."""

__version__ = "0.1.0"
