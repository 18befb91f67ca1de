"""Reports over a run's results: the static, offline HTML gallery (:mod:`camlens.report.gallery`)."""
