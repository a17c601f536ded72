"""Reading results back: the HTML run report, exports, evaluation against
labels (`scoring`), shadow comparison of two models."""
