"""repablate.analysis -- ablation tables and figures from results files; never imports training code."""
