"""The explainer: renders a plan's grouping in the terminal and as an HTML page. No math of its own."""
