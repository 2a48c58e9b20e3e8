"""HTTP serving of the final IS model (Ray Serve); see serve/app.py."""
