"""Chaos runs: ``automat chaos`` (see :mod:`deploy.chaos.run`)."""
