//! Task events to containerd, in the order the shim produced them: one thread publishes them
//! through containerd's event service, so a slow publish never holds up a task call and a
//! task's exit never overtakes its start.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::ttrpc::context;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{error, warn};

/// How long one publish may take.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

enum Message {
    Event {
        topic: &'static str,
        event: Box<dyn MessageDyn>,
    },
    Flush(mpsc::Sender<()>),
}

/// Queues events for the publishing thread.
#[derive(Clone)]
pub struct EventSender {
    queue: mpsc::Sender<Message>,
}

impl EventSender {
    /// Start the publishing thread.
    pub fn start(publisher: RemotePublisher, namespace: String) -> Self {
        let (queue, rx) = mpsc::channel::<Message>();
        thread::spawn(move || {
            for message in rx {
                match message {
                    Message::Event { topic, event } => {
                        let ctx = context::with_timeout(PUBLISH_TIMEOUT.as_nanos() as i64);
                        if let Err(e) = publisher.publish(ctx, topic, &namespace, event) {
                            error!("publishing {topic} failed: {e}");
                        }
                    }
                    Message::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        Self { queue }
    }

    /// Queue an event.
    pub fn send(&self, topic: &'static str, event: impl MessageDyn) {
        let message = Message::Event {
            topic,
            event: Box::new(event),
        };
        if self.queue.send(message).is_err() {
            warn!("event {topic} dropped: the publisher has stopped");
        }
    }

    /// Wait until every event queued so far is published (at most `limit`).
    pub fn flush(&self, limit: Duration) {
        let (done_tx, done_rx) = mpsc::channel();
        if self.queue.send(Message::Flush(done_tx)).is_ok() {
            let _ = done_rx.recv_timeout(limit);
        }
    }
}
