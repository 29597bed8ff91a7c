"""Scrubbing personal data from the text a student trains on: emails, phone numbers, card numbers.

The patterns live in :func:`router.template.scrub_pii` so the student runtime scrubs requests the
same way before embedding them; this module is the distiller's name for it.
"""

from __future__ import annotations

from router.template import scrub_pii as scrub

__all__ = ["scrub"]
