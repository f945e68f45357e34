"""Plain nn.Modules and tensor functions, no training logic."""
