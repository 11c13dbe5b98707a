//! In-process wake-ups for waiters on a task (sync wait). Where none arrive (another process
//! changed the task), waiters fall back to polling the store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Wakes sync waiters when a task reaches a terminal state in this process.
#[derive(Debug, Clone, Default)]
pub struct TaskEvents {
    waiters: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
}

/// A registration to be woken about one task; unregisters on drop.
#[derive(Debug)]
pub struct Subscription {
    events: TaskEvents,
    task_id: String,
    /// Notified when the task changes.
    pub notify: Arc<Notify>,
}

impl TaskEvents {
    /// Registers interest in `task_id`.
    pub fn subscribe(&self, task_id: &str) -> Subscription {
        let notify = self
            .waiters
            .lock()
            .expect("events lock")
            .entry(task_id.to_string())
            .or_default()
            .clone();
        Subscription {
            events: self.clone(),
            task_id: task_id.to_string(),
            notify,
        }
    }

    /// Wakes everyone waiting on `task_id`.
    pub fn notify(&self, task_id: &str) {
        let n = self
            .waiters
            .lock()
            .expect("events lock")
            .get(task_id)
            .cloned();
        if let Some(n) = n {
            n.notify_waiters();
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut map = self.events.waiters.lock().expect("events lock");
        // Two references left: the map's and ours.
        if map
            .get(&self.task_id)
            .is_some_and(|n| Arc::strong_count(n) <= 2)
        {
            map.remove(&self.task_id);
        }
    }
}
