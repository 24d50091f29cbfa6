"""The stages of the main job, one module each; the table that orders them is `flowdistill.pipeline_stages`."""
