"""End-to-end demo of the toolkit on the bundled sample images (``anoclip-demo``)."""
