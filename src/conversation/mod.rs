//! From tokens to a conversation: [`generate`] (the one generation loop and its UTF-8
//! decoder) and [`chat`] (a conversation kept in the bounded cache, turn by turn).

pub mod chat;
pub mod generate;
