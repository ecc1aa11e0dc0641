"""Placeholder: tests written against mutation survivors go here."""
