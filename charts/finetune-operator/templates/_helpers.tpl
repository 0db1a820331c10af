{{/*
Names. Kubernetes names (and label values) are at most 63 characters: every name is cut to 63 and
trimmed of a trailing "-".
*/}}
{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name: RELEASE-CHART, or RELEASE alone when it already contains the chart name.
*/}}
{{- define "finetune-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
CHART-VERSION for the helm.sh/chart label.
*/}}
{{- define "finetune-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object. Call with (dict "ctx" $ "component" "operator").
*/}}
{{- define "finetune-operator.labels" -}}
{{- $ctx := .ctx -}}
helm.sh/chart: {{ include "finetune-operator.chart" $ctx }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/part-of: finetune-operator
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
{{- with $ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels (immutable in a Deployment: never add to them). Call with (dict "ctx" $ "component" "operator").
The operator's metrics Service carries component "operator"; the trainer pods the operator creates
carry app.kubernetes.io/managed-by=finetune-operator and finetune.io/job (see builders.py).
*/}}
{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
The operator's ServiceAccount name.
*/}}
{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- required "serviceAccount.name: name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Images.
*/}}
{{- define "finetune-operator.operatorImage" -}}
{{- $img := .Values.operator.image }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) }}
{{- end }}
{{- end }}

{{- define "finetune-operator.trainerImage" -}}
{{- $img := .Values.trainer.image }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) }}
{{- end }}
{{- end }}

{{/*
Cross-field checks the schema cannot word clearly. Included by every template that depends on them.
*/}}
{{- define "finetune-operator.validate" -}}
{{- if and (eq .Values.rbac.scope "namespaces") (empty .Values.watchNamespaces) }}
{{- fail "rbac.scope=namespaces needs watchNamespaces: list the namespaces the operator may watch (or use rbac.scope=cluster to watch every namespace)" }}
{{- end }}
{{- if ne (len .Values.watchNamespaces) (len (uniq .Values.watchNamespaces)) }}
{{- fail (printf "watchNamespaces lists a namespace twice: %v" .Values.watchNamespaces) }}
{{- end }}
{{- end }}
