-- Content-addressed embedding cache shared by every job (factory/embeddings.py): one row per
-- (encoder, sha256 of the exact text). Vectors are float32, L2-normalised. Not keyed by
-- dataset on purpose: the same text embedded for two datasets or two jobs is encoded once.
create table embedding_cache (
    encoder      varchar not null,              -- encoder id (name or path + content fingerprint)
    text_sha256  varchar not null,
    dim          integer not null,
    vector       float[] not null,
    created_at   timestamp not null default current_timestamp,
    primary key (encoder, text_sha256)
);
