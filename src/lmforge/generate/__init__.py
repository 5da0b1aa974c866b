"""Text generation: sampling functions and the decoding engine."""
