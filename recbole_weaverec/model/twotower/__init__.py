"""Text two-tower sequential recommenders: TextSeqRec (one domain) and MergeRec (one merged model for many)."""
