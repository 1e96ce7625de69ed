"""Next Sample's strategies."""
