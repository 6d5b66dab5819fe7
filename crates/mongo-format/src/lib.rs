//! How pgevents' data looks in MongoDB: the event documents, the checkpoints and the dead letters.
//!
//! One place for the formats, because two programs read and write them: the consumer's MongoDB
//! sink writes all three, and `eventsctl` reads checkpoints (`status`, `lag`), moves them
//! (`reset`) and lists dead letters. A format written in one crate and parsed in another drifts;
//! here both use the same functions. The crate knows nothing of connections or sessions: it
//! builds and reads documents.

pub mod checkpoint;
pub mod dead_letter;
pub mod event;
