"""Choosing what to label next. Pure: arrays in, positions out; imports only `services.errors`.

strategies  per-item scores (least_confidence, margin, entropy, expected_focal, random)
candidates  chunked scoring's candidate lists and their exact merge
batch       wrappers: TopScores, KCenterDiversity, ClassQuota
cold_start  random or k-means-stratified picks before a model exists
"""
