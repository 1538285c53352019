"""The bottom layer of the suite: errors, safe and strict weight loading, atomic writes, frozen helper networks and
layers shared across stages. It imports nothing from the rest of the project."""
