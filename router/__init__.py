"""kdgate router package."""
