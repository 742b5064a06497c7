"""Audio and video frame handling (the voice pipeline lands here)."""
