"""The engine: networks, frozen norm statistics, tiled inference, zoos and the enhancer."""
