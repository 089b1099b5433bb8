"""organizer: sort a photo library into one folder per person."""
__version__ = "0.1.0"
