"""kdgate distiller package."""
