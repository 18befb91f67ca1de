"""``camlens serve``: a page and a JSON API to explore class activation maps in a browser.

Example:
    >>> from camlens.serve import create_app
    >>> app = create_app(["efficientnet_lite0"], max_upload_mb=20)   # run with uvicorn
"""

from camlens.serve.app import create_app

__all__ = ["create_app"]
