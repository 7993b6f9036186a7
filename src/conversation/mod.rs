//! From tokens to a conversation: [`generate`] (the one generation loop and its UTF-8
//! decoder), [`chat`] (a conversation kept in the bounded cache, turn by turn), [`delta`]
//! (what a new prompt adds to what a cache holds, for the chat and the server alike) and
//! [`jinja`] (the model's own Jinja template, for conversations with tools).

pub mod chat;
pub mod delta;
pub mod generate;
pub mod jinja;
